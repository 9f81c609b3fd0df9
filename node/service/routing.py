"""Route decisions: ``[[routes]]`` are tried in order; the first that applies wins.

A route's ``match`` maps DICOM keywords (plus ``calling_ae`` / ``called_ae``) to
case-sensitive shell-style globs; every entry must match. A multi-valued attribute matches
when any of its values does; a missing attribute matches only ``*``. A ``normalize`` route
applies only to images its method can process (Digital Mammography / Digital X-Ray
storage); for anything else it is skipped, with the reason noted, and the next route is tried.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from mr2nst.node.config import Disposition, Method, Route
from mr2nst.node.dicom.sopclasses import NORMALIZABLE_SOP_CLASSES
from mr2nst.node.errors import ConfigError

AE_KEYS = ("calling_ae", "called_ae")


@dataclass(frozen=True)
class Decision:
    """What to do with one instance.

    Attributes:
        route: the name of the route that applies; None when none does.
        action: the route's action, or ``"none"`` when no route applies.
        method: the normalization method (``normalize`` routes only).
        destinations: where the result goes.
        skipped: ``"route: reason"`` for each matching route passed over.
        priority: the route's priority (higher is claimed and sent first).
        fallback: where the original goes if normalizing fails (empty: hold it).
        forward_original: where the original goes at once, beside the normalized result.
    """

    route: str | None
    action: Disposition
    method: Method | None
    destinations: tuple[str, ...]
    skipped: tuple[str, ...] = field(default=())
    priority: int = 0
    fallback: tuple[str, ...] = ()
    forward_original: tuple[str, ...] = ()


def check_routes(routes: Sequence[Route]) -> None:
    """Check that every match key is a DICOM keyword or an AE key.

    Raises:
        ConfigError: a key is neither; the message names it.
    """
    for index, route in enumerate(routes):
        for key in route.match:
            if key not in AE_KEYS and tag_for_keyword(key) is None:
                raise ConfigError(
                    f"routes[{index}].match.{key}: not a DICOM keyword (nor calling_ae/called_ae)"
                )


def _values(ds: Dataset, keyword: str) -> list[str]:
    """The values of ``keyword`` in ``ds`` as strings; empty when it is missing."""
    value: object = ds.get(keyword)
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def matches(match: Mapping[str, str], ds: Dataset, calling_ae: str, called_ae: str) -> bool:
    """True when every glob of ``match`` matches the instance."""
    aes = {"calling_ae": calling_ae, "called_ae": called_ae}
    for key, pattern in match.items():
        values = [aes[key]] if key in aes else _values(ds, key)
        if not values:
            if pattern != "*":
                return False
            continue
        if not any(fnmatchcase(v.strip(), pattern) for v in values):
            return False
    return True


class Router:
    """Decides the route of each instance from the configured routes.

    Args:
        routes: the ``[[routes]]``, in the order they are tried.

    Raises:
        ConfigError: a route matches on a key that is not a DICOM keyword or AE key.
    """

    def __init__(self, routes: Sequence[Route]) -> None:
        check_routes(routes)
        self._routes = tuple(routes)

    def replace(self, routes: Sequence[Route]) -> None:
        """Decide from now on with ``routes`` (a config reload); decisions in progress finish
        with the routes they started with.

        Raises:
            ConfigError: a route matches on a key that is not a DICOM keyword or AE key.
        """
        check_routes(routes)
        self._routes = tuple(routes)

    def decide(self, ds: Dataset, calling_ae: str, called_ae: str) -> Decision:
        """The first route that matches and applies to ``ds``.

        Args:
            ds: the received data set.
            calling_ae: the sender's AE title.
            called_ae: the AE title the sender called.

        Returns:
            That route's decision, or one with action ``"none"`` when no route applies.
        """
        skipped: list[str] = []
        routes = self._routes  # one consistent set, even if a reload replaces them now
        sop_class = str(ds.get("SOPClassUID", ""))
        for route in routes:
            if not matches(route.match, ds, calling_ae, called_ae):
                continue
            if route.action == "normalize" and sop_class not in NORMALIZABLE_SOP_CLASSES:
                skipped.append(
                    f"{route.name}: SOP class {sop_class or '?'} is not an image to normalize"
                )
                continue
            method = route.method if route.action == "normalize" else None
            return Decision(
                route.name,
                route.action,
                method,
                route.destinations,
                tuple(skipped),
                priority=route.priority,
                fallback=route.fallback,
                forward_original=route.forward_original,
            )
        return Decision(None, "none", None, (), tuple(skipped))
