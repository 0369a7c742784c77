"""`roundhouse`: talk to the control plane, and run it.

Three kinds of commands: client commands (`orchestrator.cli.jobs`: submit, watch, list, get, logs, cancel;
`orchestrator.cli.sweeps`: sweep submit, get, list, cancel) reach a control plane over gRPC and import nothing
of it or of the ranks; operator commands (`orchestrator.cli.operator`: serve, token, offload plan) run the control plane or
work on its database, where it runs; tools (`orchestrator.cli.tools`: mup coord-check) run rank-side code in a
child interpreter.
Preparing training data is the ranks' side: `roundhouse-data prepare` (trainers/prepare_cli.py).

Exit codes: 0 ok; 1 the job failed or was cancelled, or the server refused or could not be reached; 2 bad
input (an invalid spec, an unknown state, a malformed label)."""

from __future__ import annotations

import typer

from orchestrator.cli import jobs, operator, sweeps, tools

app = typer.Typer(help="Roundhouse: submit training jobs to a control plane and watch them; run the control "
                       "plane.", no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None)
app.add_typer(jobs.app)
app.add_typer(operator.app)
app.add_typer(sweeps.app, name="sweep")
app.add_typer(operator.token_app, name="token")
app.add_typer(tools.mup_app, name="mup")
app.add_typer(operator.offload_app, name="offload")

__all__ = ["app"]
