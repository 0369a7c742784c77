"""Operator commands: `roundhouse serve` runs the control plane; `roundhouse token` manages users' tokens on
its database. They run where the control plane runs, and import it only when called. `roundhouse offload plan`
sizes a job spec for optimizer-state offload by running the ranks' own planner (`python -m offload plan`) in a
subprocess: the CLI imports no rank-side code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from orchestrator import config
from orchestrator.cli.common import console, errors, fail
from orchestrator.launcher.registry import launcher_names

app = typer.Typer()
offload_app = typer.Typer(help="Optimizer-state offload: does a job fit, and how would it run.",
                          no_args_is_help=True)
token_app = typer.Typer(help="Manage users' API tokens, on the control plane's database (run it where the "
                             "server runs, e.g. kubectl exec).", no_args_is_help=True)


def _known_launcher(name: str) -> str:
    installed = launcher_names()
    if name not in installed:
        raise typer.BadParameter(f"{name!r} is not an installed launcher (one of: {', '.join(installed)})")
    return name


# -- serve -------------------------------------------------------------------------------------------------

@app.command()
def serve(
    db: Annotated[str | None, typer.Option(metavar="URL", show_default=False,
                                           help="database URL, e.g. postgresql+psycopg://user@host/db "
                                                "[default: SQLite in the home directory]")] = None,
    home: Annotated[Path | None, typer.Option(metavar="DIR", show_default=False,
                                              help="state directory: database, admin token, runs' logs "
                                                   "[default: $ROUNDHOUSE_HOME or ~/.roundhouse]")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(min=0, max=65535, help="gRPC API port (0: any free port)")]
    = config.DEFAULT_GRPC_PORT,
    http_port: Annotated[int, typer.Option(min=0, max=65535, help="status page port (0: any free port)")]
    = config.DEFAULT_HTTP_PORT,
    launcher: Annotated[str, typer.Option(metavar="NAME", callback=_known_launcher,
                                          help="where ranks run: local or kubernetes (any launcher installed "
                                               "under the roundhouse.launchers entry points)")] = "local",
    max_ranks: Annotated[int | None, typer.Option(min=1, metavar="N", show_default=False,
                                                  help="the most ranks to run at once; a job asking for more "
                                                       "runs reshaped to a smaller valid layout "
                                                       "[default: local: this machine's cores; kubernetes: no "
                                                       "limit]")] = None,
    data_root: Annotated[list[Path] | None, typer.Option(metavar="DIR", show_default=False, exists=True,
                                                         file_okay=False, resolve_path=True,
                                                         help="a directory a job's data.path may name "
                                                              "(repeatable) [default: none: only the "
                                                              "built-in corpus]")] = None,
    controller_workers: Annotated[int, typer.Option(min=1, metavar="N",
                                                    help="jobs the controller works on at once")] = 4,
    max_streams_per_user: Annotated[int, typer.Option(min=1, metavar="N",
                                                      help="streams (watches, followed logs) one user may hold "
                                                           "open at once")] = 32,
    tls_cert: Annotated[Path | None, typer.Option(metavar="FILE", show_default=False, exists=True, dir_okay=False,
                                                  rich_help_panel="TLS",
                                                  help="serve gRPC and the dashboard over TLS with this "
                                                       "certificate (PEM; with --tls-key)")] = None,
    tls_key: Annotated[Path | None, typer.Option(metavar="FILE", show_default=False, exists=True, dir_okay=False,
                                                 rich_help_panel="TLS", help="the certificate's private key (PEM)")]
    = None,
    tls_client_ca: Annotated[Path | None, typer.Option(metavar="FILE", show_default=False, exists=True,
                                                       dir_okay=False, rich_help_panel="TLS",
                                                       help="require gRPC clients to present a certificate "
                                                            "this CA signed (mutual TLS)")] = None,
    tls_ranks_ca: Annotated[Path | None, typer.Option(metavar="FILE", show_default=False, exists=True,
                                                      dir_okay=False, rich_help_panel="TLS",
                                                      help="the CA ranks trust for this server's certificate "
                                                           "[default: the --tls-cert file]")] = None,
    tls_ranks_cert: Annotated[Path | None, typer.Option(metavar="FILE", show_default=False, exists=True,
                                                        dir_okay=False, rich_help_panel="TLS",
                                                        help="with --tls-client-ca: the certificate ranks "
                                                             "present (with --tls-ranks-key)")] = None,
    tls_ranks_key: Annotated[Path | None, typer.Option(metavar="FILE", show_default=False, exists=True,
                                                       dir_okay=False, rich_help_panel="TLS",
                                                       help="the key of --tls-ranks-cert")] = None,
    public_url: Annotated[str | None, typer.Option(envvar="ROUNDHOUSE_PUBLIC_URL", metavar="URL", show_default=False,
                                                   rich_help_panel="Dashboard",
                                                   help="where browsers reach the dashboard, e.g. "
                                                        "https://roundhouse.example.com: its logins, logouts and "
                                                        "cancels must come from this origin (set it for a team) "
                                                        "[default: a request's Origin is compared with its own "
                                                        "Host]")] = None,
    session_ttl: Annotated[int, typer.Option(min=60, metavar="SECONDS", rich_help_panel="Dashboard",
                                             help="how long a dashboard login lasts, in seconds (43200: 12 h)")]
    = config.DEFAULT_SESSION_TTL_SECONDS,
    limits_file: Annotated[Path | None, typer.Option("--limits", metavar="FILE", show_default=False, exists=True,
                                                     dir_okay=False, rich_help_panel="Limits",
                                                     help="YAML: what a job may ask for, per-user quotas, "
                                                          "Kubernetes allow-lists and default resources (README: "
                                                          "Running Roundhouse for a team) [default: no limits]")]
    = None,
    max_ranks_per_job: Annotated[int | None, typer.Option(min=1, metavar="N", show_default=False,
                                                          rich_help_panel="Limits",
                                                          help="refuse a job of more ranks (tp*pp*dp)")] = None,
    max_active_jobs_per_user: Annotated[int | None, typer.Option(min=1, metavar="N", show_default=False,
                                                                 rich_help_panel="Limits",
                                                                 help="refuse a user's job while they have this "
                                                                      "many unfinished")] = None,
    max_active_ranks_per_user: Annotated[int | None, typer.Option(min=1, metavar="N", show_default=False,
                                                                  rich_help_panel="Limits",
                                                                  help="refuse a user's job that would take their "
                                                                       "unfinished jobs' ranks past this")] = None,
    max_parameters: Annotated[int | None, typer.Option(min=1, metavar="N", show_default=False,
                                                       rich_help_panel="Limits",
                                                       help="refuse a model of more parameters")] = None,
    max_gpus_per_rank: Annotated[int | None, typer.Option(min=0, metavar="N", show_default=False,
                                                          rich_help_panel="Limits",
                                                          help="refuse a job asking more GPUs per rank")] = None,
    namespace: Annotated[str, typer.Option(envvar="ROUNDHOUSE_NAMESPACE", rich_help_panel="Kubernetes",
                                           help="namespace of the jobs' pods")] = "default",
    kubeconfig: Annotated[str | None, typer.Option(metavar="FILE", show_default=False, rich_help_panel="Kubernetes",
                                                   help="kubeconfig [default: in-cluster config inside a pod, "
                                                        "else ~/.kube/config]")] = None,
    image: Annotated[str, typer.Option(envvar="ROUNDHOUSE_TRAINER_IMAGE", rich_help_panel="Kubernetes",
                                       help="trainer image (a job's kubernetes.image overrides it)")]
    = "roundhouse/trainer:0.1.0",
    volume_claim: Annotated[str | None, typer.Option(envvar="ROUNDHOUSE_VOLUME_CLAIM", show_default=False,
                                                     rich_help_panel="Kubernetes",
                                                     help="PersistentVolumeClaim (ReadWriteMany) for data and "
                                                          "checkpoints [default: an emptyDir, for trials]")] = None,
    unschedulable_timeout: Annotated[float, typer.Option(metavar="SECONDS", rich_help_panel="Kubernetes",
                                                         help="fail an attempt whose pod stays unschedulable "
                                                              "this long")] = 300.0,
    advertise_address: Annotated[str | None, typer.Option(envvar="ROUNDHOUSE_ADVERTISE_ADDRESS", show_default=False,
                                                          metavar="HOST:PORT",
                                                          help="how ranks reach this server [default: "
                                                               "HOST:GRPC_PORT]")] = None,
    reconcile: Annotated[bool, typer.Option("--reconcile/--no-reconcile", hidden=True,
                                            help="run the reconciler (off: jobs are recorded, never launched)")]
    = True,
    allow_test_hooks: Annotated[bool, typer.Option("--allow-test-hooks", hidden=True,
                                                   help="for tests only: let a spec's env set the trainer's "
                                                        "test and fault hooks (RH_TEST_*, RH_FAULT_*)")] = False,
) -> None:
    """Run the control plane: gRPC API, status page and reconciler, until Ctrl-C."""
    from sqlalchemy.exc import SQLAlchemyError

    from contract.errors import SpecError
    from orchestrator.dashboard.security import public_origin
    from orchestrator.server import ServerSettings, run_server
    from orchestrator.tls import ServerTls

    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together", 2)
    if tls_cert is None and (tls_client_ca or tls_ranks_ca):
        fail("--tls-client-ca and --tls-ranks-ca need --tls-cert and --tls-key", 2)
    if (tls_client_ca is None) != (tls_ranks_cert is None) or (tls_ranks_cert is None) != (tls_ranks_key is None):
        fail("--tls-client-ca, --tls-ranks-cert and --tls-ranks-key go together (with mutual TLS the ranks "
             "present a certificate too)", 2)
    if public_url is not None:
        try:
            public_origin(public_url)
        except ValueError as exc:
            fail(str(exc), 2)
    tls = ServerTls(tls_cert, tls_key, tls_client_ca, tls_ranks_ca, tls_ranks_cert, tls_ranks_key) if tls_cert else None

    from orchestrator.service.limits import Limits, load_limits

    try:
        limits = load_limits(str(limits_file)) if limits_file else Limits()
    except SpecError as exc:
        fail(f"{limits_file}: invalid limits: {exc}", 2)
    except OSError as exc:
        fail(f"cannot read {limits_file}: {exc.strerror or exc}", 2)
    flags = {"ranks_per_job": max_ranks_per_job, "active_jobs_per_user": max_active_jobs_per_user,
             "active_ranks_per_user": max_active_ranks_per_user, "parameters": max_parameters,
             "gpus_per_rank": max_gpus_per_rank}
    limits = limits.model_copy(update={k: v for k, v in flags.items() if v is not None})  # flags win

    options = {}
    if launcher == "kubernetes":
        options = {"namespace": namespace, "image": image, "volume_claim": volume_claim,
                   "unschedulable_timeout_seconds": unschedulable_timeout}
    settings = ServerSettings(home=(home or config.home_dir()).expanduser(), db_url=db, host=host,
                              grpc_port=grpc_port, http_port=http_port, launcher=launcher, launcher_options=options,
                              max_ranks=max_ranks, reconcile=reconcile, kubeconfig=kubeconfig,
                              advertise_address=advertise_address, data_roots=tuple(data_root or ()),
                              allow_test_hooks=allow_test_hooks, controller_workers=controller_workers,
                              max_streams_per_user=max_streams_per_user, tls=tls, limits=limits,
                              public_url=public_url, session_ttl_seconds=session_ttl)
    try:
        run_server(settings)
    except (OSError, ValueError, SQLAlchemyError) as exc:
        fail(f"cannot start the control plane: {exc}")


# -- token -------------------------------------------------------------------------------------------------

TokenDb = Annotated[str | None, typer.Option("--db", metavar="URL", show_default=False,
                                             help="the control plane's database URL [default: SQLite in the "
                                                  "home directory]")]
TokenHome = Annotated[Path | None, typer.Option(metavar="DIR", show_default=False,
                                                help="the control plane's state directory [default: "
                                                     "$ROUNDHOUSE_HOME or ~/.roundhouse]")]


def _token_database(db: str | None, home: Path | None):
    from orchestrator.store import Database, migrate

    if db is None:
        home = (home or config.home_dir()).expanduser()
        home.mkdir(parents=True, exist_ok=True)
        db = config.default_db_url(home)
    database = Database(db)
    migrate(database)
    return database


@token_app.command("create")
def token_create(
    user: Annotated[str, typer.Option(help="who the token is for: jobs they submit are theirs")],
    role: Annotated[str, typer.Option(help="admin (may cancel any job) or user (its own)")] = "user",
    db: TokenDb = None,
    home: TokenHome = None,
) -> None:
    """Create a token and print it (only its digest is stored: this is the one time it is shown)."""
    from orchestrator.auth import create_token

    database = _token_database(db, home)
    try:
        token = create_token(database, user, role)
    except ValueError as exc:
        fail(str(exc), 2)
    finally:
        database.dispose()
    print(token)
    errors.print(f"created a {role} token for {user}; use it as ROUNDHOUSE_TOKEN or --token, or to log in to "
                 "the dashboard")


@token_app.command("list")
def token_list(db: TokenDb = None, home: TokenHome = None) -> None:
    """Every user with a token, their role and how many tokens they have."""
    from orchestrator.auth import list_tokens

    database = _token_database(db, home)
    try:
        rows = list_tokens(database)
    finally:
        database.dispose()
    table = Table(box=None, pad_edge=False)
    for header in ("USER", "ROLE", "TOKENS"):
        table.add_column(header)
    for user, role, count in rows:
        table.add_row(user, role, str(count))
    console.print(table)


@token_app.command("revoke")
def token_revoke(
    user: Annotated[str, typer.Option(help="whose tokens to delete (all of them)")],
    db: TokenDb = None,
    home: TokenHome = None,
) -> None:
    """Delete every token of a user; servers stop accepting them within seconds."""
    from orchestrator.auth import revoke_tokens

    database = _token_database(db, home)
    try:
        count = revoke_tokens(database, user)
    finally:
        database.dispose()
    if count == 0:
        fail(f"{user} has no token", 1)
    console.print(f"revoked {count} token(s) of {user}")


# -- offload plan ------------------------------------------------------------------------------------------

@offload_app.command("plan")
def offload_plan(
    spec: Annotated[Path, typer.Argument(metavar="SPEC", exists=True, dir_okay=False,
                                         help="a job spec (YAML): its model, layout, precision and "
                                              "training.offload")],
    measure: Annotated[bool, typer.Option("--measure", help="measure this machine's device and CPU now")] = False,
    profile: Annotated[str | None, typer.Option(metavar="NAME", show_default=False,
                                                help="a known machine profile, e.g. h200-pcie5 [default: the "
                                                     "spec's training.offload.profile]")] = None,
) -> None:
    """Whether the job fits at its layout with and without optimizer-state offload, which mode to run, and the
    predicted optimizer update time with no offload, DeepSpeed's CPU offload and interleaved offload."""
    if measure and profile:
        fail("give --measure or --profile, not both", 2)
    command = [sys.executable, "-m", "offload", "plan", "--spec", str(spec)]
    command += ["--measure"] if measure else ["--profile", profile] if profile else []
    # The planner counts the model's parameters from the trainer's own parameter table: rank-side code, run in
    # its own process. Its output and exit code are this command's.
    code = subprocess.run(command, check=False).returncode
    if code:
        raise typer.Exit(code)
