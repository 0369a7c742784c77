"""`python -m orchestrator.cli` is `roundhouse`."""

from orchestrator.cli import app

app()
