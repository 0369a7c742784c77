"""TLS: `roundhouse serve --tls-cert/--tls-key` serves gRPC and the dashboard over TLS; the CLI's client
trusts a CA it is given; ranks get the certificate to trust through their environment and their reporting
channel uses TLS; with --tls-client-ca, a client must present a certificate (mutual TLS). The certificates
are self-signed, made here by the openssl binary."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from contract.rank_env import SERVER_CA, RankEnv
from contract.spec import parse_spec, spec_to_proto
from orchestrator.auth import job_token, rank_credential_key
from orchestrator.client import ClientError, ClientTls, JobClient
from orchestrator.config import token_file
from orchestrator.launcher import RankTls
from orchestrator.server import ControlPlane, ServerSettings
from orchestrator.store import Attempt, AttemptState, Job
from orchestrator.tls import ServerTls
from tests.support.waiting import DEADLINE
from trainers.reporting import Reporter

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl binary")


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost (its own CA) and its key."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-addext", "basicConstraints=critical,CA:TRUE"],
                   check=True, capture_output=True)
    return cert, key


def serve(home: Path, tls: ServerTls) -> ControlPlane:
    plane = ControlPlane(ServerSettings(home=home, db_url=None, grpc_port=0, http_port=0, reconcile=False, tls=tls))
    plane.start()
    return plane


@pytest.fixture
def tls_plane(tmp_path) -> Iterator[tuple[ControlPlane, Path]]:
    cert, key = self_signed(tmp_path, "server")
    plane = serve(tmp_path / "home", ServerTls(cert, key))
    yield plane, cert
    plane.stop()


def test_the_api_and_the_dashboard_are_served_over_tls_to_a_client_that_trusts_the_ca(tls_plane):
    plane, cert = tls_plane
    token = token_file(plane.settings.home).read_text().strip()
    with JobClient(plane.grpc_address, token, ClientTls(ca=str(cert))) as client:
        created = client.create_job(spec_to_proto(parse_spec({"name": "secure"})))
        assert client.get_job("secure").uid == created.uid
    with JobClient(f"grpcs://{plane.grpc_address}", token, ClientTls(ca=str(cert))) as client:
        assert client.get_job("secure").name == "jobs/secure"

    with JobClient(plane.grpc_address, token) as plaintext, pytest.raises(ClientError) as refused:
        plaintext.get_job("secure")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    with JobClient(f"grpcs://{plane.grpc_address}", token) as untrusted, pytest.raises(ClientError) as unknown_ca:
        untrusted.get_job("secure")  # the system's CAs did not sign a self-signed certificate
    assert unknown_ca.value.code == grpc.StatusCode.UNAVAILABLE

    assert plane.dashboard_url.startswith("https://")
    response = httpx.get(f"{plane.dashboard_url}healthz", verify=ssl.create_default_context(cafile=str(cert)),
                         timeout=DEADLINE)
    assert response.status_code == 200


def test_ranks_are_given_the_ca_and_report_over_tls(tls_plane):
    plane, cert = tls_plane
    assert plane.job_controller.rank_tls == RankTls(cert.read_text())  # what every LaunchRequest carries
    environ = RankEnv(spec_json="{}", server=plane.grpc_address, server_ca=cert.read_text()).to_environ()
    assert RankEnv.from_environ(environ).server_ca == cert.read_text() and SERVER_CA in environ

    token = token_file(plane.settings.home).read_text().strip()
    with JobClient(plane.grpc_address, token, ClientTls(ca=str(cert))) as client:
        uid = client.create_job(spec_to_proto(parse_spec({"name": "ranked"}))).uid
    with plane.db.session() as session:
        job = session.get(Job, "ranked")
        job.attempts.append(Attempt(job_name="ranked", number=1, state=AttemptState.RUNNING, tp=1, pp=1, dp=1,
                                    world_size=1))
    assert_reports_over_tls(plane, uid, RankEnv(spec_json="{}", server_ca=cert.read_text()))


def assert_reports_over_tls(plane: ControlPlane, uid: str, env: RankEnv) -> None:
    """A rank of attempt 1 of job "ranked" with the environment's TLS heartbeats until the server has one."""
    said: list[str] = []
    reporter = Reporter(plane.grpc_address, "jobs/ranked", 1, 0, job_token(rank_credential_key(plane.db), uid, 1),
                        server_ca=env.server_ca, client_cert=env.client_cert, client_key=env.client_key,
                        heartbeat_interval=0.2, log=said.append)
    reporter.start()
    try:
        deadline = time.monotonic() + DEADLINE
        while 0 not in plane.heartbeats.beats("ranked", 1):
            assert time.monotonic() < deadline, said
            time.sleep(0.05)
    finally:
        reporter.close()
    assert said == []  # no outage: every call went through


def test_with_a_client_ca_clients_and_ranks_present_a_certificate(tmp_path):
    server_cert, server_key = self_signed(tmp_path, "server")
    client_cert, client_key = self_signed(tmp_path, "client")  # its own CA: the client CA
    plane = serve(tmp_path / "home", ServerTls(server_cert, server_key, client_ca=client_cert,
                                               ranks_cert=client_cert, ranks_key=client_key))
    try:
        token = token_file(plane.settings.home).read_text().strip()
        with JobClient(plane.grpc_address, token, ClientTls(ca=str(server_cert))) as anonymous, \
                pytest.raises(ClientError) as refused:
            anonymous.list_jobs()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        known = ClientTls(ca=str(server_cert), cert=str(client_cert), key=str(client_key))
        with JobClient(plane.grpc_address, token, known) as client:
            assert list(client.list_jobs().jobs) == []
            uid = client.create_job(spec_to_proto(parse_spec({"name": "ranked"}))).uid

        rank_tls = plane.job_controller.rank_tls
        assert rank_tls == RankTls(server_cert.read_text(), client_cert.read_text(), client_key.read_text())
        with plane.db.session() as session:
            job = session.get(Job, "ranked")
            job.attempts.append(Attempt(job_name="ranked", number=1, state=AttemptState.RUNNING, tp=1, pp=1, dp=1,
                                        world_size=1))
        environ = RankEnv(spec_json="{}", server_ca=rank_tls.server_ca, client_cert=rank_tls.client_cert,
                          client_key=rank_tls.client_key).to_environ()
        assert_reports_over_tls(plane, uid, RankEnv.from_environ(environ))
    finally:
        plane.stop()
