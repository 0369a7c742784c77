"""orchestrator/api/errors.py's InternalErrors: a handler's unexpected exception reaches the client as INTERNAL
with an error id (logged with the details), never as UNKNOWN with its text; a handler's own abort passes
unchanged. On the thread-based gRPC server and on grpc.aio, for every kind of handler."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from orchestrator.api.errors import AsyncInternalErrors, InternalErrors

SECRET = "SELECT token FROM users"


def fails(request, context):
    raise RuntimeError(SECRET)


def refuses(request, context):
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name: bad")


def answers(request, context):
    return request


def fails_streaming(request, context):
    yield b"first"
    raise RuntimeError(SECRET)


async def fails_async(request, context):
    raise RuntimeError(SECRET)


async def refuses_async(request, context):
    await context.abort(grpc.StatusCode.NOT_FOUND, "job jobs/x not found")


async def fails_async_streaming(request, context):
    yield b"first"
    raise RuntimeError(SECRET)


SYNC_METHODS = {"Fails": grpc.unary_unary_rpc_method_handler(fails),
                "Refuses": grpc.unary_unary_rpc_method_handler(refuses),
                "Answers": grpc.unary_unary_rpc_method_handler(answers),
                "FailsStreaming": grpc.unary_stream_rpc_method_handler(fails_streaming)}
ASYNC_METHODS = {**SYNC_METHODS, "FailsAsync": grpc.unary_unary_rpc_method_handler(fails_async),
                 "RefusesAsync": grpc.unary_unary_rpc_method_handler(refuses_async),
                 "FailsAsyncStreaming": grpc.unary_stream_rpc_method_handler(fails_async_streaming)}


@pytest.fixture(scope="module", params=["threads", "aio"])
def server(request) -> Iterator[tuple[str, set[str]]]:
    if request.param == "threads":
        grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[InternalErrors()])
        grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", SYNC_METHODS),))
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        grpc_server.start()
        yield f"127.0.0.1:{port}", set(SYNC_METHODS)
        grpc_server.stop(0)
        return
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        aio_server = grpc.aio.server(migration_thread_pool=futures.ThreadPoolExecutor(max_workers=4),
                                     interceptors=[AsyncInternalErrors()])
        aio_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", ASYNC_METHODS),))
        bound = aio_server.add_insecure_port("127.0.0.1:0")
        await aio_server.start()
        return aio_server, bound

    aio_server, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    yield f"127.0.0.1:{port}", set(ASYNC_METHODS)
    asyncio.run_coroutine_threadsafe(aio_server.stop(0), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


def call(address: str, method: str) -> grpc.RpcError | bytes:
    with grpc.insecure_channel(address) as channel:
        try:
            if "Streaming" in method:
                return b"".join(channel.unary_stream(f"/t.T/{method}")(b"x", timeout=30))
            return channel.unary_unary(f"/t.T/{method}")(b"x", timeout=30)
        except grpc.RpcError as error:
            return error


@pytest.mark.parametrize("method", ["Fails", "FailsStreaming", "FailsAsync", "FailsAsyncStreaming"])
def test_an_unexpected_error_is_internal_with_a_logged_id(server, method, caplog):
    address, methods = server
    if method not in methods:
        pytest.skip("a coroutine handler needs grpc.aio")
    with caplog.at_level(logging.ERROR, logger="orchestrator.api.errors"):
        error = call(address, method)
    assert error.code() == grpc.StatusCode.INTERNAL and SECRET not in error.details()
    error_id = error.details().split("(id ")[1].split(")")[0]
    assert any(error_id in r.getMessage() and method in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.parametrize(("method", "code"), [("Refuses", grpc.StatusCode.INVALID_ARGUMENT),
                                              ("RefusesAsync", grpc.StatusCode.NOT_FOUND)])
def test_a_handlers_own_abort_passes_unchanged(server, method, code):
    address, methods = server
    if method not in methods:
        pytest.skip("a coroutine handler needs grpc.aio")
    error = call(address, method)
    assert error.code() == code and "INTERNAL" not in error.details()


def test_an_answer_passes_unchanged(server):
    assert call(server[0], "Answers") == b"x"
