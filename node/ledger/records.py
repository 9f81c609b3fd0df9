"""What goes into the ledger and what comes out of it: one received instance, and the
processing jobs and deliveries that workers and forwarders claim."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import RowMapping

from mr2nst.node.config import Disposition
from mr2nst.node.ledger.states import InstanceState

#: Seconds since the epoch; tests pass a fake one.
Clock = Callable[[], float]

#: Who moves an instance on: a worker (``method``), the forwarder alone (``forward``), or
#: nobody (``none``: dropped or unrouted).
Lane = Literal["method", "light", "forward", "none"]

#: What a delivery sends: the method's output, or the received file unchanged.
Payload = Literal["derived", "original"]


#: Methods that take seconds at most: their jobs go to the light lane.
LIGHT_METHODS = frozenset({"passthrough", "ehm", "spectral"})
#: Every lane a worker can claim from, and the one a light worker claims from.
WORKER_LANES: tuple[Lane, ...] = ("method", "light")
LIGHT_LANES: tuple[Lane, ...] = ("light",)


# The ledger state a route decision starts an instance in (normalize: received). A forward
# is ready to send at once: the forwarder takes it, no worker (its own lane).
_STATE_OF_ACTION = {
    "drop": InstanceState.DROPPED,
    "none": InstanceState.UNROUTED,
    "forward": InstanceState.TRANSFORMED,
}


def state_of_action(action: str) -> InstanceState:
    """The ledger state a route decision starts an instance in (the SCP and a rebuild)."""
    return _STATE_OF_ACTION.get(action, InstanceState.RECEIVED)


def lane_of(action: Disposition, method: str | None = None) -> Lane:
    """The lane of an instance whose route decided ``action`` with ``method``."""
    if action == "normalize":
        return "light" if method in LIGHT_METHODS else "method"
    if action == "forward":
        return "forward"
    return "none"


@dataclass(frozen=True)
class Received:
    """What the SCP records for one received instance.

    ``priority``, ``fallback_destinations`` and ``forward_original`` come from the route
    (see :class:`~mr2nst.node.config.Route`); ``fallback_destinations`` empty means hold.
    """

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    peer: str
    route: str | None
    action: Disposition
    method: str | None
    destinations: tuple[str, ...]
    state: InstanceState
    spool_path: str | None
    priority: int = 0
    fallback_destinations: tuple[str, ...] = ()
    forward_original: tuple[str, ...] = ()

    @property
    def lane(self) -> Lane:
        """The instance's lane, from its route's action and method."""
        return lane_of(self.action, self.method)


@dataclass(frozen=True)
class Job:
    """A claimed processing job (of the ``method`` or ``light`` lane)."""

    id: int
    action: str
    method: str | None
    route: str | None
    spool_path: str
    destinations: tuple[str, ...]
    attempts: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    calling_ae: str
    received_at: float
    lane: Lane = "method"
    priority: int = 0
    fallback_destinations: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeliveryJob:
    """A claimed delivery: send ``path`` (the ``payload``'s file) to ``destination``."""

    id: int
    instance_id: int
    destination: str
    attempts: int
    path: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    route: str | None
    payload: Payload = "derived"


def job_from_row(row: RowMapping) -> Job:
    """The job of a just-claimed ``instances`` row (``attempts`` counts the claim)."""
    return Job(
        id=row["id"],
        action=row["action"],
        method=row["method"],
        route=row["route"],
        spool_path=row["spool_path"] or "",
        destinations=tuple(json.loads(row["destinations"])),
        attempts=row["attempts"] + 1,
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        sop_instance_uid=row["sop_instance_uid"],
        calling_ae=row["calling_ae"],
        received_at=row["received_at"],
        lane=row["lane"],
        priority=row["priority"],
        fallback_destinations=tuple(json.loads(row["fallback_destinations"] or "[]")),
    )


def delivery_job_from_row(row: RowMapping) -> DeliveryJob:
    """The delivery of a just-claimed row of deliveries joined with its instance.

    An ``original`` delivery sends the received file (``spool_path``, which follows the file
    if it was moved), a ``derived`` one the method's output (``output_path``).
    """
    original = row["payload"] == "original"
    return DeliveryJob(
        id=row["id"],
        instance_id=row["instance_id"],
        destination=row["destination"],
        attempts=row["attempts"] + 1,
        path=(row["spool_path"] if original else row["output_path"]) or "",
        sop_instance_uid=row["sop_instance_uid"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        route=row["route"],
        payload="original" if original else "derived",
    )
