"""Launchers by name. Each launcher publishes a factory under the `roundhouse.launchers` entry-point group
(see pyproject.toml: `local` in orchestrator.launcher.local, `kubernetes` in k8s.launcher); the control
plane asks for one by name and never imports an implementation, so another distribution can add one.

A factory takes the server's settings (orchestrator.server.ServerSettings) and returns a Launcher; it reads
what it needs: its own options come in `settings.launcher_options`."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol

from orchestrator.launcher import Launcher

if TYPE_CHECKING:
    from orchestrator.server import ServerSettings

ENTRY_POINT_GROUP = "roundhouse.launchers"


class LauncherFactory(Protocol):
    def __call__(self, settings: ServerSettings) -> Launcher: ...


def launcher_names() -> list[str]:
    """The launchers installed, by name."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def launcher_factory(name: str) -> LauncherFactory:
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        installed = ", ".join(launcher_names()) or "none: is the roundhouse distribution installed (make install)?"
        raise ValueError(f"unknown launcher {name!r} (installed: {installed})")
    return found[0].load()


def create_launcher(settings: ServerSettings) -> Launcher:
    """The launcher `settings.launcher` names, made from the settings."""
    return launcher_factory(settings.launcher)(settings)
