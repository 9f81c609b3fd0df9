"""What goes into the ledger and what comes out of it: one received instance, and the
processing jobs and deliveries that workers and forwarders claim."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import RowMapping

from mr2nst.node.config import Disposition
from mr2nst.node.ledger.states import InstanceState

#: Seconds since the epoch; tests pass a fake one.
Clock = Callable[[], float]


@dataclass(frozen=True)
class Received:
    """What the SCP records for one received instance."""

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


@dataclass(frozen=True)
class Job:
    """A claimed processing job."""

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


@dataclass(frozen=True)
class DeliveryJob:
    """A claimed delivery: send ``path`` to ``destination``."""

    id: int
    instance_id: int
    destination: str
    attempts: int
    path: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    route: str | None


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
    )


def delivery_job_from_row(row: RowMapping) -> DeliveryJob:
    """The delivery of a just-claimed row of deliveries joined with its instance."""
    return DeliveryJob(
        id=row["id"],
        instance_id=row["instance_id"],
        destination=row["destination"],
        attempts=row["attempts"] + 1,
        path=row["output_path"] or "",
        sop_instance_uid=row["sop_instance_uid"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        route=row["route"],
    )
