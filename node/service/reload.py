"""Reloading routes and destinations while the node runs (SIGHUP, ``mr2nst config reload``).

Only ``[[routes]]`` and ``[destinations.*]`` change in a running node: the SCP decides
each instance with the routes in force when it arrives, and the forwarder looks each
destination up when it sends, so associations in flight are not dropped. Every other
section (ports, TLS, ledger, workers, engine, methods) is read once at start; a change
there is reported as needing a restart and is not applied. A file that does not load or
check leaves the running configuration untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from mr2nst.node.config import Config
from mr2nst.node.methods.registry import (
    check_cyclegan,
    check_engine,
    check_fast,
    check_methods,
    uses_cyclegan,
    uses_engine,
    uses_fast,
)
from mr2nst.node.service.routing import check_routes

#: The sections a running node takes from a reloaded file.
RELOADABLE = ("routes", "destinations")


@dataclass(frozen=True)
class ReloadPlan:
    """What a reload changes.

    Attributes:
        config: the running configuration with the new file's routes and destinations.
        changed: the reloadable sections that differ from the running ones.
        needs_restart: the other sections that differ (not applied until a restart).
    """

    config: Config
    changed: tuple[str, ...]
    needs_restart: tuple[str, ...]


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """Check a newly loaded configuration against the running one.

    The routes are checked against the running node's method settings, since its
    workers keep those; when routes first bring in the ``mr2nst`` method, its engine is
    built once, as at start.

    Args:
        running: the configuration in force.
        new: the configuration just loaded from the file.

    Returns:
        The plan; apply ``plan.config``.

    Raises:
        ConfigError: a route matches on an unknown key or names an unknown method.
        WeightsError: the routes newly use the ``mr2nst`` method and its weights are unusable.
        EngineConfigError: likewise for its settings or refiner.
    """
    merged = running.model_copy(update={section: getattr(new, section) for section in RELOADABLE})
    check_routes(merged.routes)
    check_methods(merged)
    if uses_engine(merged) and not uses_engine(running):
        check_engine(merged)
    if uses_fast(merged) and not uses_fast(running):
        check_fast(merged)
    if uses_cyclegan(merged) and not uses_cyclegan(running):
        check_cyclegan(merged)
    changed = tuple(s for s in RELOADABLE if getattr(running, s) != getattr(new, s))
    needs_restart = tuple(
        s
        for s in type(running).model_fields
        if s not in RELOADABLE and getattr(running, s) != getattr(new, s)
    )
    return ReloadPlan(merged, changed, needs_restart)
