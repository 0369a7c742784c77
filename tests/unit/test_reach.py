"""What a spec may reach (issue 12): its checkpoints stay in its job's directory, its data inside the operator's
data roots, its test hooks only on a server started for tests; and the rank environment, written by the
launchers and read by the rank through one definition (contract.rank_env)."""

from __future__ import annotations

import grpc
import pytest

from contract import job_dirs
from contract.rank_env import RankEnv, RankEnvError
from contract.reach import DataPathError, reach_violations, resolve_data_path
from contract.spec import parse_spec
from orchestrator.config import token_file
from orchestrator.server import ControlPlane, ServerSettings
from orchestrator.store import Event, Job
from roundhouse.v1 import job_service_pb2 as js
from trainers.env import ConfigError, TestHooks, checkpoint_root, data_path

from tests.conftest import Client
from tests.integration.test_api import field_violations, rows, spec


# -- data roots --------------------------------------------------------------------------------------------

def test_a_data_path_resolves_only_inside_a_root(tmp_path):
    roots = [tmp_path / "data", tmp_path / "more"]
    assert resolve_data_path(str(tmp_path / "more" / "corpus"), roots) == str(tmp_path / "more" / "corpus")
    assert resolve_data_path("corpus/a.txt", roots) == str(tmp_path / "data" / "corpus" / "a.txt")  # first root
    for outside in ("../home/state.db", str(tmp_path / "data" / ".." / "home"), "/etc/passwd",
                    str(tmp_path / "data-other" / "x")):  # a sibling whose name starts like a root is not in it
        with pytest.raises(DataPathError, match="outside the server's data roots"):
            resolve_data_path(outside, roots)
    with pytest.raises(DataPathError, match="no data roots"):
        resolve_data_path(str(tmp_path / "data" / "x"), [])


def test_a_symlink_inside_a_root_that_leads_out_is_refused_where_it_is_opened(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "data" / "link").symlink_to(tmp_path / "secret")
    roots = [tmp_path / "data"]
    assert resolve_data_path("link", roots)  # by its text it is inside: the control plane cannot tell
    with pytest.raises(DataPathError, match="secret"):
        resolve_data_path("link", roots, follow_symlinks=True)  # the rank resolves it
    spec = parse_spec({"name": "d", "data": {"path": "link"}})
    with pytest.raises(ConfigError, match="data.path"):
        data_path(spec, RankEnv(spec_file="x", data_roots=(str(tmp_path / "data"),)))
    assert data_path(parse_spec({"name": "d"}), RankEnv(spec_file="x", data_roots=())) is None  # built-in corpus


# -- the job's directories -----------------------------------------------------------------------------------

def test_checkpoints_live_under_the_jobs_directory(tmp_path):
    job = job_dirs.job_dir(tmp_path / "runs", "j")
    assert job_dirs.checkpoint_dir(job, parse_spec({"name": "j"}).checkpoint) == job / "checkpoints"
    named = parse_spec({"name": "j", "checkpoint": {"directory": "keep/ckpt"}}).checkpoint
    assert job_dirs.checkpoint_dir(job, named) == job / "keep" / "ckpt"
    forged = named.model_copy(update={"directory": "../other"})  # never passed the spec gate
    with pytest.raises(job_dirs.OutsideJobDir, match="'..'"):
        job_dirs.checkpoint_dir(job, forged)


def test_a_symlink_inside_the_job_directory_pointing_out_is_refused_before_anything_is_created(tmp_path):
    job = tmp_path / "runs" / "j"
    job.mkdir(parents=True)
    other = tmp_path / "runs" / "other" / "checkpoints"
    other.mkdir(parents=True)
    (job / "ckpt").symlink_to(other.parent)
    with pytest.raises(job_dirs.OutsideJobDir, match="outside the job's directory"):
        job_dirs.make_inside(job, job / "ckpt" / "checkpoints")
    with pytest.raises(job_dirs.OutsideJobDir):
        job_dirs.make_inside(job, job / "ckpt" / "new")
    assert not (other.parent / "new").exists()
    # The rank checks again before it reads or deletes a checkpoint there.
    env = RankEnv(spec_file="x", job_dir=str(job), checkpoint_dir=str(job / "ckpt" / "checkpoints"))
    with pytest.raises(ConfigError, match="checkpoint.directory"):
        checkpoint_root(parse_spec({"name": "j"}), env)
    inside = RankEnv(spec_file="x", job_dir=str(job), checkpoint_dir=str(job / "checkpoints"))
    assert checkpoint_root(parse_spec({"name": "j"}), inside) == (job / "checkpoints").resolve()


# -- the rank environment ------------------------------------------------------------------------------------

def test_the_rank_environment_round_trips():
    env = RankEnv(rank=3, world_size=4, local_rank=1, local_world_size=2, master_addr="h", master_port=1234,
                  spec_file="/s.json", server="cp:1", job="jobs/j", attempt=2, token="t", run_dir="/r",
                  start_step=7, job_dir="/j", checkpoint_dir="/j/checkpoints", data_roots=("/d1", "/d2"),
                  test_hooks=True)
    assert RankEnv.from_environ(env.to_environ()) == env
    no_roots = RankEnv(spec_file="/s.json", data_roots=())
    assert RankEnv.from_environ(no_roots.to_environ()).data_roots == ()  # set but empty: no roots at all
    assert RankEnv.from_environ({"ROUNDHOUSE_SPEC_FILE": "/s"}).data_roots is None  # by hand: not checked
    with pytest.raises(RankEnvError, match="ROUNDHOUSE_ATTEMPT"):
        RankEnv.from_environ({"ROUNDHOUSE_SPEC_FILE": "/s", "ROUNDHOUSE_ATTEMPT": "two"})


def test_a_rank_honours_test_hooks_only_when_its_launcher_says_so(capsys):
    environ = {"RH_FAULT_EXIT_AT_STEP": "3", "RH_TEST_STEP_SLEEP": "1"}
    assert TestHooks.from_environ(environ, enabled=False) == TestHooks()
    assert "ignoring RH_FAULT_EXIT_AT_STEP, RH_TEST_STEP_SLEEP" in capsys.readouterr().err
    hooks = TestHooks.from_environ(environ, enabled=True)
    assert hooks.should_crash(0, 3) and hooks.step_sleep == 1.0


# -- at CreateJob: INVALID_ARGUMENT naming the field, nothing written ----------------------------------------

def test_policy_checks_name_each_field():
    data = {"name": "p", "data": {"path": "/etc"}, "env": {"RH_FAULT_EXIT_AT_STEP": "2", "rh_test_x": "1"}}
    fields = [v.field for v in reach_violations(parse_spec(data), ["/srv/data"], allow_test_hooks=False)]
    assert fields == ["data.path", "env.RH_FAULT_EXIT_AT_STEP", "env.rh_test_x"]
    assert [v.field for v in reach_violations(parse_spec(data), ["/srv/data"], allow_test_hooks=True)] == ["data.path"]


@pytest.fixture
def production_plane(db_url, tmp_path):
    """A control plane as an operator runs it: one data root, test hooks not allowed."""
    (tmp_path / "data").mkdir()
    plane = ControlPlane(ServerSettings(home=tmp_path / "home", db_url=db_url, grpc_port=0, http_port=0,
                                        reconcile=False, data_roots=(tmp_path / "data",)))
    plane.start()
    client = Client(plane.grpc_address, token_file(plane.settings.home).read_text().strip())
    yield plane, client
    client.close()
    plane.stop()


REFUSED_BY_POLICY = [
    pytest.param({"env": {"RH_FAULT_EXIT_AT_STEP": "2"}}, "spec.env.RH_FAULT_EXIT_AT_STEP", id="fault hook"),
    pytest.param({"env": {"RH_TEST_STEP_SLEEP": "0.1"}}, "spec.env.RH_TEST_STEP_SLEEP", id="test hook"),
    pytest.param({"data": {"path": "/etc"}}, "spec.data.path", id="data outside the roots"),
    pytest.param({"data": {"path": "../home/roundhouse.db"}}, "spec.data.path", id="data escaping a root"),
]


@pytest.mark.parametrize(("sections", "field"), REFUSED_BY_POLICY)
def test_a_production_server_refuses_what_a_spec_may_not_reach(production_plane, sections, field):
    plane, client = production_plane
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec("p", **sections)), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == [field]
    assert rows(plane, Job) == 0 and rows(plane, Event) == 0


def test_a_production_server_accepts_data_inside_its_roots(production_plane, tmp_path):
    plane, client = production_plane
    for path in ("corpus", str(tmp_path / "data" / "other")):
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec(f"d{len(path)}", data={"path": path})),
                              metadata=client.metadata)
    assert rows(plane, Job) == 2


def test_a_server_without_data_roots_allows_only_the_built_in_corpus(client, api_plane, tmp_path):
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec("d", data={"path": str(tmp_path)})),
                              metadata=client.metadata)
    assert field_violations(info.value) == ["spec.data.path"] and "no data roots" in info.value.details()
    assert rows(api_plane, Job) == 0
    # The test server (test hooks allowed) takes a spec with a test hook.
    client.jobs.CreateJob(js.CreateJobRequest(spec=spec("h", env={"RH_TEST_STEP_SLEEP": "0.1"})),
                          metadata=client.metadata)
    assert rows(api_plane, Job) == 1



@pytest.mark.parametrize("directory", [None, "keep"])
def test_a_symlink_already_in_the_job_directory_leading_out_is_refused_at_create(client, api_plane, tmp_path,
                                                                                  directory):
    other = tmp_path / "other-job" / "checkpoints"
    other.mkdir(parents=True)
    job = api_plane.settings.home / "runs" / "linked"
    job.mkdir(parents=True)
    (job / (directory or "checkpoints")).symlink_to(other)
    checkpoint = {"directory": directory} if directory else {}
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec("linked", checkpoint=checkpoint)), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(info.value) == ["spec.checkpoint.directory"]
    assert rows(api_plane, Job) == 0 and rows(api_plane, Event) == 0


def test_a_job_directory_that_is_itself_a_symlink_out_is_refused_at_create(client, api_plane, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (api_plane.settings.home / "runs").mkdir(parents=True, exist_ok=True)
    (api_plane.settings.home / "runs" / "moved").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(grpc.RpcError) as info:
        client.jobs.CreateJob(js.CreateJobRequest(spec=spec("moved")), metadata=client.metadata)
    assert field_violations(info.value) == ["spec.checkpoint.directory"]
    assert rows(api_plane, Job) == 0
