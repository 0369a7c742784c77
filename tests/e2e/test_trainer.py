"""The rank-side trainer (`python -m trainers`) on its own: real processes, real text, gloo between ranks, and
a stand-in control plane (an in-test TrainerService) for the reporting path.

Covers: a single rank trains on a text directory and its loss falls; two data-parallel ranks reproduce a
single rank's losses step for step; a short run on the built-in corpus gets its validation loss well below
the corpus's unigram entropy; the fault hook exits 17; heartbeats and metrics reach the control plane with the
job's identity and token, survive an outage, and stop=True ends the run with code 3. Plus fast in-process
checks of the sampler, the schedule and the configuration errors."""

from __future__ import annotations

import codecs
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from orchestrator.launcher.local import free_port
from contract.spec import load_spec_file, parse_spec
from roundhouse.v1 import trainer_service_pb2 as ts, trainer_service_pb2_grpc
from trainers import data as data_module
from trainers import main as main_module
from trainers.reporting import Reporter, metric_point
from trainers.schedule import lr_at
from tests.support.waiting import DEADLINE

TINY_MODEL = {"layers": 2, "hidden_size": 32, "heads": 2, "seq_length": 32}
STEP_LINE = re.compile(r"^step (\d+)/(\d+) loss (\S+) lr (\S+) tok/s (\S+)$", re.MULTILINE)
VAL_LINE = re.compile(r"^step (\d+)/(\d+) val_loss (\S+)$", re.MULTILINE)
TOKEN = "s3cret-job-token"


# -- helpers -----------------------------------------------------------------------------------------------

def write_spec(directory: Path, **sections) -> Path:
    data = {"name": "trainer-test", "model": TINY_MODEL, **sections}
    path = directory / f"spec-{len(list(directory.glob('spec-*.json')))}.json"
    path.write_text(json.dumps(parse_spec(data).model_dump(mode="json")))
    return path


def start_rank(spec_file: Path, run_dir: Path, rank: int = 0, world_size: int = 1, port: int = 29500,
               server: str | None = None, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROUNDHOUSE_", "RH_"))}
    # One OpenMP thread per rank (a test may ask otherwise): the trainer sets one thread itself only when it has
    # peers, and a lone rank's second thread spins against the other processes on a two-core machine (a
    # 20-step single-rank run took four times the CPU time with it).
    env["OMP_NUM_THREADS"] = "1"
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ROUNDHOUSE_SPEC_FILE": str(spec_file),
                "ROUNDHOUSE_JOB": "jobs/trainer-test", "ROUNDHOUSE_ATTEMPT": "2", "ROUNDHOUSE_JOB_TOKEN": TOKEN,
                "ROUNDHOUSE_RUN_DIR": str(run_dir), "ROUNDHOUSE_TEST_HOOKS": "1", "PYTHONUNBUFFERED": "1"})
    if server:
        env["ROUNDHOUSE_SERVER"] = server
    env.update(extra_env or {})
    return subprocess.Popen([sys.executable, "-m", "trainers"], env=env, cwd=run_dir, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, timeout: float = DEADLINE) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the trainer did not finish in {timeout}s\n{out}\n{err}") from None
    return proc.returncode, out, err


def run_ranks(spec_file: Path, run_dir: Path, world_size: int = 1, **kwargs) -> list[tuple[int, str, str]]:
    port = free_port()
    procs = [start_rank(spec_file, run_dir, rank, world_size, port, **kwargs) for rank in range(world_size)]
    return [finish(p) for p in procs]


def losses(stdout: str) -> list[float]:
    return [float(m.group(3)) for m in STEP_LINE.finditer(stdout)]


def val_losses(stdout: str) -> list[float]:
    return [float(m.group(3)) for m in VAL_LINE.finditer(stdout)]


def text_corpus(directory: Path) -> Path:
    """A small directory of real English text, in two files (the loader reads directories recursively)."""
    zen = codecs.decode(__import__("this").s, "rot13")
    (directory / "corpus" / "more").mkdir(parents=True)
    (directory / "corpus" / "a.txt").write_text(zen * 20)
    (directory / "corpus" / "more" / "b.txt").write_text(__doc__ * 20)
    return directory / "corpus"


# -- training for real -------------------------------------------------------------------------------------

def test_single_rank_trains_on_a_text_directory(tmp_path):
    spec = write_spec(tmp_path, data={"path": str(text_corpus(tmp_path))},
                      training={"steps": 40, "global_batch_size": 8, "micro_batch_size": 4,
                                "learning_rate": 0.01, "warmup_steps": 5})
    [(code, out, err)] = run_ranks(spec, tmp_path)
    assert code == 0, err
    steps = losses(out)
    assert len(steps) == 40
    assert sum(steps[-5:]) / 5 < steps[0] - 1.0, out  # from ln(256) = 5.5 to well below


def test_data_parallel_matches_a_single_rank(tmp_path):
    training = {"steps": 15, "global_batch_size": 8, "micro_batch_size": 2, "learning_rate": 0.005,
                "warmup_steps": 3, "eval_interval": 5, "seed": 7, "weight_decay": 0.1}
    single = write_spec(tmp_path, training=training)
    double = write_spec(tmp_path, training=training, parallelism={"dp": 2})
    # Run both at once: three processes on two cores is slower per process, not in total.
    reference_port, dp_port = free_port(), free_port()
    reference = start_rank(single, tmp_path, 0, 1, reference_port)
    ranks = [start_rank(double, tmp_path, rank, 2, dp_port) for rank in range(2)]
    (code, ref_out, ref_err), *results = [finish(p) for p in [reference, *ranks]]
    assert code == 0, ref_err
    for rank_code, _, rank_err in results:
        assert rank_code == 0, rank_err
    dp_out = results[0][1]
    assert losses(results[1][1]) == []  # only rank 0 logs steps
    # The same global batch, split 4 micro-batches on one rank vs 2 on each of 2 ranks: the same mathematics,
    # but gloo sums the two ranks' gradients in another order than local accumulation does, so the floats
    # can differ in the last bits (and Adam carries that forward); bit-for-bit equality is not expected.
    assert len(losses(dp_out)) == len(losses(ref_out)) == 15
    assert losses(dp_out) == pytest.approx(losses(ref_out), rel=1e-5)
    assert len(val_losses(dp_out)) == 3
    assert val_losses(dp_out) == pytest.approx(val_losses(ref_out), rel=1e-5)


def test_the_tiny_example_learns_beyond_byte_frequencies(tmp_path):
    example = load_spec_file(str(Path(__file__).parents[2] / "examples" / "tiny-gpt.yaml"))
    spec = tmp_path / "tiny-gpt.json"
    spec.write_text(example.model_dump_json())
    results = run_ranks(spec, tmp_path, world_size=example.world_size)
    for code, _, err in results:
        assert code == 0, err
    (code, out, err), *_ = results
    entropy = data_module.unigram_entropy(data_module.encode(data_module.load_corpus(None)))
    final_val = val_losses(out)[-1]
    # A model that only knew byte frequencies would sit at `entropy`; context must buy a clear margin.
    assert final_val < entropy - 0.4, (final_val, entropy)


def test_fault_hook_exits_17(tmp_path):
    spec = write_spec(tmp_path, training={"steps": 20, "global_batch_size": 4, "micro_batch_size": 4})
    [(code, out, _)] = run_ranks(spec, tmp_path, extra_env={"RH_FAULT_EXIT_AT_STEP": "3"})
    assert code == 17
    assert [int(m.group(1)) for m in STEP_LINE.finditer(out)] == [1, 2]


def test_fault_hook_hits_only_its_rank_and_the_peer_fails(tmp_path):
    spec = write_spec(tmp_path, training={"steps": 20, "global_batch_size": 4, "micro_batch_size": 2},
                      parallelism={"dp": 2})
    (code0, _, err0), (code1, _, _) = run_ranks(spec, tmp_path, world_size=2,
                                                extra_env={"RH_FAULT_EXIT_AT_STEP": "2", "RH_FAULT_RANK": "1"})
    assert code1 == 17
    assert code0 == 1, err0  # its peer is gone: the collective fails, the traceback says so
    assert "Traceback" in err0


# -- reporting to the control plane ------------------------------------------------------------------------

class FakeControlPlane(trainer_service_pb2_grpc.TrainerServiceServicer):
    """Records every call (heartbeats and metrics with their metadata); answers stop=True from the
    `stop_after`-th heartbeat on."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.heartbeats: list[tuple[ts.HeartbeatRequest, dict]] = []
        self.reports: list[tuple[ts.ReportMetricsRequest, dict]] = []
        self.checkpoints: list[ts.ReportCheckpointRequest] = []
        self.lock = threading.Lock()

    def Heartbeat(self, request, context):
        with self.lock:
            self.heartbeats.append((request, dict(context.invocation_metadata())))
            stop = self.stop_after is not None and len(self.heartbeats) > self.stop_after
        return ts.HeartbeatResponse(stop=stop, stop_reason="the job was cancelled" if stop else "")

    def ReportMetrics(self, request, context):
        with self.lock:
            self.reports.append((request, dict(context.invocation_metadata())))
        return ts.ReportMetricsResponse()

    def ReportCheckpoint(self, request, context):
        # Accepted and recorded: a rank that checkpoints sends its metrics only after its checkpoint reports.
        with self.lock:
            self.checkpoints.append(request)
        return ts.ReportCheckpointResponse()

    def points(self):
        with self.lock:
            return [p for request, _ in self.reports for p in request.points]


def serve(servicer: FakeControlPlane, port: int = 0) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def control_plane():
    planes = []

    def start(stop_after: int | None = None) -> tuple[FakeControlPlane, str]:
        plane = FakeControlPlane(stop_after)
        server, address = serve(plane)
        planes.append(server)
        return plane, address

    yield start
    for server in planes:
        server.stop(None)


def test_heartbeats_and_metrics_reach_the_control_plane(tmp_path, control_plane):
    plane, address = control_plane()
    spec = write_spec(tmp_path, data={"path": str(text_corpus(tmp_path))},
                      training={"steps": 12, "global_batch_size": 8, "micro_batch_size": 8,
                                "learning_rate": 0.01, "eval_interval": 6})
    [(code, out, err)] = run_ranks(spec, tmp_path, server=address, extra_env={"RH_TEST_STEP_SLEEP": "0.2"})
    assert code == 0, err

    assert len(plane.heartbeats) >= 2
    for request, metadata in plane.heartbeats:
        assert (request.job, request.attempt, request.rank) == ("jobs/trainer-test", 2, 0)
        assert metadata["authorization"] == f"Bearer {TOKEN}"
    assert max(r.step for r, _ in plane.heartbeats) >= 5  # heartbeats follow the training
    for request, metadata in plane.reports:
        assert (request.job, request.attempt, request.rank) == ("jobs/trainer-test", 2, 0)
        assert metadata["authorization"] == f"Bearer {TOKEN}"

    points = plane.points()
    assert [p.step for p in points] == list(range(1, 13))  # one point per step, each once, in order
    assert all(p.HasField("loss") and p.tokens_per_second > 0 and p.memory_bytes > 10 << 20 and
               p.learning_rate > 0 and p.attempt == 2 and p.HasField("time") for p in points)
    assert [p.step for p in points if p.HasField("val_loss")] == [6, 12]
    assert [p.loss for p in points] == pytest.approx(losses(out), abs=1e-6)
    assert points[-1].loss < points[0].loss - 1.0


@pytest.mark.parametrize("world_size", [1, 2])
def test_stop_from_the_control_plane_exits_3(tmp_path, control_plane, world_size):
    plane, address = control_plane(stop_after=2)
    spec = write_spec(tmp_path, training={"steps": 1000, "global_batch_size": 4, "micro_batch_size": 2},
                      parallelism={"dp": world_size})
    results = run_ranks(spec, tmp_path, world_size=world_size, server=address,
                        extra_env={"RH_TEST_STEP_SLEEP": "0.05"})
    for code, out, err in results:
        assert code == 3, err
        assert "stopping after step" in out
    assert "the job was cancelled" in results[0][1]
    steps = [int(m.group(1)) for m in STEP_LINE.finditer(results[0][1])]
    assert 0 < steps[-1] < 1000  # stopped by the control plane, not by the end of training (no timed bound)


def test_metrics_survive_an_outage(tmp_path):
    """Points queued while the control plane is down arrive once it is up; past the bound, the oldest go."""
    port = free_port()
    log: list[str] = []
    reporter = Reporter(f"127.0.0.1:{port}", "jobs/x", 1, 0, TOKEN, heartbeat_interval=0.2,
                        metrics_interval=0.1, max_pending=40, log=log.append)
    reporter.start()  # a daemon thread: if an assertion fails before close(), it dies with the test process
    for step in range(1, 51):
        reporter.add_point(metric_point(step, 1, 0, loss=1.0 / step))
    time.sleep(1.0)  # several failed rounds
    assert reporter.pending == 40 and reporter.stop_reason is None
    plane = FakeControlPlane()
    server, _ = serve(plane, port)
    try:
        deadline = time.monotonic() + DEADLINE
        while reporter.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        reporter.add_point(metric_point(51, 1, 0, loss=0.5))
    finally:
        reporter.close(flush_timeout=5)
        server.stop(None)
    assert [p.step for p in plane.points()] == list(range(11, 52))
    assert len([m for m in log if "cannot reach" in m]) == 1, log  # logged once for the whole outage
    assert any("reachable again" in m and "10 oldest" in m for m in log), log


# -- fast, in-process --------------------------------------------------------------------------------------

def test_sampler_depends_only_on_seed_and_step_and_splits_by_rank():
    text = data_module.TextData(bytes(range(256)) * 40, seq_length=16, seed=3)
    whole = text.train_batch(5, 8)
    assert torch.equal(whole.inputs, text.train_batch(5, 8).inputs)
    assert not torch.equal(whole.inputs, text.train_batch(6, 8).inputs)
    assert not torch.equal(whole.inputs, data_module.TextData(bytes(range(256)) * 40, 16, seed=4).train_batch(5, 8).inputs)
    shares = [text.train_batch(5, 8, rank, 4) for rank in range(4)]
    assert torch.equal(torch.cat([s.inputs for s in shares]), whole.inputs)
    assert torch.equal(whole.targets[:, :-1], whole.inputs[:, 1:])
    val = text.val_batch()
    assert torch.equal(torch.cat([text.val_batch(r, 3).inputs for r in range(3)]), val.inputs)


def test_corpus_errors(tmp_path):
    with pytest.raises(data_module.DataError, match="does not exist"):
        data_module.load_corpus(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data_module.DataError, match="no data"):
        data_module.load_corpus(str(tmp_path / "empty"))
    with pytest.raises(data_module.DataError, match="too small"):
        data_module.TextData(b"tiny", seq_length=32, seed=0)


def test_builtin_corpus_is_python_source():
    corpus = data_module.load_corpus(None)
    assert len(corpus) == data_module.BUILTIN_CORPUS_BYTES
    assert b"def " in corpus and b"import " in corpus


def test_schedules():
    def spec(**training):
        return parse_spec({"name": "s", "training": {"steps": 100, "learning_rate": 1.0, **training}}).training

    warm = spec(warmup_steps=10, lr_schedule="constant")
    assert [lr_at(s, warm) for s in (1, 5, 10, 11, 100)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    cosine = [lr_at(s, spec(lr_schedule="cosine")) for s in range(1, 101)]
    assert cosine[0] == 1.0 and all(a >= b for a, b in zip(cosine, cosine[1:])) and 0.1 <= cosine[-1] < 0.11
    linear = [lr_at(s, spec(lr_schedule="linear", warmup_steps=20)) for s in range(1, 101)]
    assert linear[19] == 1.0 and linear[-1] == pytest.approx(1 / 80) and linear[50] > linear[60]


def run_main(monkeypatch, spec_file: Path) -> int:
    for key in list(os.environ):
        if key.startswith(("ROUNDHOUSE_", "RH_")) or key in ("RANK", "WORLD_SIZE"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ROUNDHOUSE_SPEC_FILE", str(spec_file))
    return main_module.main()


def test_missing_data_path_fails_clearly(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, data={"path": str(tmp_path / "nowhere")})
    assert run_main(monkeypatch, spec) == 1
    assert "nowhere' does not exist" in capsys.readouterr().err


def test_missing_spec_file_is_a_configuration_error(tmp_path, monkeypatch, capsys):
    assert run_main(monkeypatch, tmp_path / "absent.json") == 2
    assert "cannot read the spec file" in capsys.readouterr().err


def test_trains_on_a_prepared_token_dataset(tmp_path):
    from trainers.prepare import prepare
    from trainers.tokenizer import ByteTokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, path in enumerate(data_module.builtin_corpus_files()[:40]):
        (corpus / f"{i:02d}-{path.name}").write_bytes(path.read_bytes())
    report = prepare([corpus], tmp_path / "tokens", ByteTokenizer())
    assert report.documents == 40
    spec = write_spec(tmp_path, data={"path": str(report.index_path)},
                      training={"steps": 4, "global_batch_size": 4, "micro_batch_size": 2, "warmup_steps": 0,
                                "eval_interval": 4})
    [(code, out, err)] = run_ranks(spec, tmp_path)
    assert code == 0, err
    assert f"{report.tokens:,} tokens ({report.index_path})" in out
    assert len(losses(out)) == 4 and len(val_losses(out)) == 1
