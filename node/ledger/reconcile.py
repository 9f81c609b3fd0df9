"""Reconcile the spool and outbox with the ledger: find, and re-register, orphaned files.

A file in ``spool/in`` or ``outbox/`` was acknowledged (or derived from an acknowledged
instance); its ledger row says what is left to do with it. When the ledger is lost
(deleted, emptied, restored from an old backup) while the node is stopped, such files
have no row. The node refuses to start then (:func:`find_orphans`), and
``mr2nst ledger rebuild`` re-registers each file from its own DICOM header
(:func:`rebuild`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import insert, select

from mr2nst.node.ledger.outgoing import add_delivery
from mr2nst.node.ledger.records import Received, state_of_action
from mr2nst.node.ledger.schema import instances
from mr2nst.node.ledger.states import InstanceState
from mr2nst.node.ledger.store import Ledger

if TYPE_CHECKING:
    from mr2nst.node.service.routing import Decision

#: The router's ``decide``: (dataset, calling AE, called AE) -> Decision.
Decide = Callable[[Dataset, str, str], "Decision"]

#: A spool/in file without a row, written this close (seconds) to the newest recorded
#: arrival, is taken for a receive interrupted between the file's rename and its row's
#: commit (never acknowledged), not for a lost ledger.
INTERRUPTED_WINDOW_S = 120.0


@dataclass(frozen=True)
class Orphans:
    """Files under ``data_dir`` that no ledger row refers to.

    Attributes:
        incoming: received files in ``spool/in`` (acknowledged: the ledger lost them).
        outbox: derived outputs in ``outbox/`` whose source has no row.
        interrupted: ``spool/in`` files written around the newest recorded arrival: a
            receive cut between the file and its row (never acknowledged).
    """

    incoming: tuple[Path, ...] = ()
    outbox: tuple[Path, ...] = ()
    interrupted: tuple[Path, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.incoming or self.outbox)

    def summary(self) -> str:
        """In words: ``3 file(s) in spool/in and 2 in outbox/``."""
        return f"{len(self.incoming)} file(s) in spool/in and {len(self.outbox)} in outbox/"


@dataclass
class RebuildReport:
    """What :func:`rebuild` did.

    Attributes:
        registered: ``{"path", "job_id", "kind", "route", "action"}`` per file re-registered.
        left: ``{"path", "reason"}`` per file that could not be re-registered (left in place).
    """

    registered: list[dict[str, object]] = field(default_factory=list)
    left: list[dict[str, object]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """The report as JSON-ready data."""
        return {"registered": self.registered, "left": self.left}


@dataclass(frozen=True)
class _Known:
    """What the ledger's rows refer to."""

    paths: frozenset[str]
    sources: frozenset[str]  # source SOP Instance UIDs
    outputs: frozenset[str]  # output SOP Instance UIDs
    newest: float | None  # the newest received_at


def _known(ledger: Ledger) -> _Known:
    paths: set[str] = set()
    sources: set[str] = set()
    outputs: set[str] = set()
    newest: float | None = None
    query = select(
        instances.c.spool_path,
        instances.c.output_path,
        instances.c.sop_instance_uid,
        instances.c.out_sop_uid,
        instances.c.received_at,
    )
    with ledger.engine.connect() as conn:
        for spool_path, output_path, sop_uid, out_sop_uid, received_at in conn.execute(query):
            for value in (spool_path, output_path):
                if value:
                    paths.add(str(Path(value).resolve()))
            sources.add(str(sop_uid))
            if out_sop_uid:
                outputs.add(str(out_sop_uid))
            if received_at is not None and (newest is None or received_at > newest):
                newest = float(received_at)
    return _Known(frozenset(paths), frozenset(sources), frozenset(outputs), newest)


def _files(directory: Path) -> list[Path]:
    """The plain files of ``directory`` (none when it does not exist), sorted by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file())


def _source_of(path: Path) -> str | None:
    """The source SOP Instance UID an output names (None when unreadable or absent)."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SourceImageSequence"])
        return str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    except Exception:  # edge: not DICOM, or no source reference
        return None


def find_orphans(ledger: Ledger, incoming: Path, outbox: Path) -> Orphans:
    """The files of ``incoming`` (spool/in) and ``outbox`` that no ledger row refers to.

    An output whose name or source a row knows is not an orphan: a worker stopped between
    writing it and recording it, and rewrites it (same name) when it runs the job again.

    Args:
        ledger: the open ledger.
        incoming: the spool's ``spool/in`` directory.
        outbox: the ``outbox/`` directory.
    """
    known = _known(ledger)
    lost: list[Path] = []
    interrupted: list[Path] = []
    for path in _files(incoming):
        if str(path.resolve()) in known.paths:
            continue
        recent = known.newest is not None and path.stat().st_mtime >= (
            known.newest - INTERRUPTED_WINDOW_S
        )
        (interrupted if recent else lost).append(path)
    outputs = [
        p
        for p in _files(outbox)
        if str(p.resolve()) not in known.paths
        and p.stem not in known.outputs
        and _source_of(p) not in known.sources
    ]
    return Orphans(incoming=tuple(lost), outbox=tuple(outputs), interrupted=tuple(interrupted))


def received_of(
    ds: Dataset,
    decision: Decision,
    *,
    transfer_syntax: str,
    calling_ae: str,
    called_ae: str,
    peer: str,
    spool_path: str | None,
) -> Received:
    """The ledger record of one received instance and its route decision."""
    return Received(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        transfer_syntax=transfer_syntax,
        calling_ae=calling_ae,
        called_ae=called_ae,
        peer=peer,
        route=decision.route,
        action=decision.action,
        method=decision.method,
        destinations=decision.destinations,
        state=state_of_action(decision.action),
        spool_path=spool_path,
        priority=decision.priority,
        fallback_destinations=decision.fallback,
        forward_original=decision.forward_original,
    )


def _read(path: Path) -> Dataset:
    """The header of a spooled DICOM file (raises on a file that is not DICOM)."""
    ds = dcmread(path, stop_before_pixels=True)
    str(ds.SOPClassUID)  # required: raises AttributeError when absent
    str(ds.SOPInstanceUID)
    return ds


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _register_incoming(
    ledger: Ledger, path: Path, decide: Decide, called_ae: str, report: RebuildReport
) -> None:
    try:
        ds = _read(path)
        # The calling AE and peer are lost with the ledger: routes on calling_ae miss.
        decision = decide(ds, "", called_ae)
    except Exception as exc:  # edge: an unreadable file or a route that cannot evaluate it
        report.left.append({"path": str(path), "reason": f"{exc.__class__.__name__}: {exc}"})
        return
    record = received_of(
        ds,
        decision,
        transfer_syntax=_transfer_syntax(ds),
        calling_ae="",
        called_ae=called_ae,
        peer="",
        spool_path=str(path.resolve()),
    )
    job_id = ledger.record(record)
    report.registered.append(
        {
            "path": str(path),
            "job_id": job_id,
            "kind": "received",
            "route": decision.route,
            "action": decision.action,
        }
    )


def _register_output(
    ledger: Ledger, path: Path, decide: Decide, called_ae: str, report: RebuildReport
) -> None:
    try:
        ds = _read(path)
        source = ds.get("SourceImageSequence")
        if not source:
            raise ValueError("no SourceImageSequence: the source instance is unknown")
        source_sop = str(source[0].ReferencedSOPInstanceUID)
        decision = decide(ds, "", called_ae)
    except Exception as exc:  # edge: an unreadable file or a route that cannot evaluate it
        report.left.append({"path": str(path), "reason": f"{exc.__class__.__name__}: {exc}"})
        return
    if decision.action != "normalize" or not decision.destinations:
        report.left.append(
            {
                "path": str(path),
                "reason": f"no normalize route with destinations matches it "
                f"(route {decision.route!r}, action {decision.action})",
            }
        )
        return
    now = ledger.clock()
    with ledger.engine.begin() as conn:
        result = conn.execute(
            insert(instances).values(
                sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=source_sop,
                study_uid=str(ds.get("StudyInstanceUID", "")),
                series_uid="",  # the source series is not in the output's header
                transfer_syntax=_transfer_syntax(ds),
                calling_ae="",
                called_ae=called_ae,
                peer="",
                route=decision.route,
                action=decision.action,
                method=decision.method,
                destinations=json.dumps(list(decision.destinations)),
                fallback_destinations=json.dumps(list(decision.fallback)),
                state=InstanceState.TRANSFORMED,
                lane="method",
                priority=decision.priority,
                attempts=0,
                spool_path=None,
                output_path=str(path.resolve()),
                out_series_uid=str(ds.get("SeriesInstanceUID", "")),
                out_sop_uid=str(ds.SOPInstanceUID),
                received_at=now,
                updated_at=now,
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        job_id = int(key[0])
        for dest in decision.destinations:
            add_delivery(conn, job_id, dest, "derived", now)
    report.registered.append(
        {
            "path": str(path),
            "job_id": job_id,
            "kind": "output",
            "route": decision.route,
            "action": decision.action,
        }
    )


def rebuild(
    ledger: Ledger, incoming: Path, outbox: Path, decide: Decide, called_ae: str
) -> RebuildReport:
    """Re-register every orphaned file from its own DICOM header.

    A ``spool/in`` file is routed again with the current routes (as the SCP routes a new
    arrival, without its calling AE, which is lost) and recorded as received. An
    ``outbox/`` file (a derived output whose source row is lost) is recorded as
    transformed with one pending delivery per destination of the normalize route that
    matches it; when none does, or its header does not name its source, it is left in
    place and listed. A second run finds nothing to do.

    Args:
        ledger: the open ledger.
        incoming: the spool's ``spool/in`` directory.
        outbox: the ``outbox/`` directory.
        decide: the router's ``decide``.
        called_ae: the node's AE title (recorded as the called AE).
    """
    orphans = find_orphans(ledger, incoming, outbox)
    report = register_incoming(ledger, orphans.incoming + orphans.interrupted, decide, called_ae)
    for path in orphans.outbox:
        _register_output(ledger, path, decide, called_ae, report)
    return report


def register_incoming(
    ledger: Ledger, paths: Sequence[Path], decide: Decide, called_ae: str
) -> RebuildReport:
    """Re-register ``spool/in`` files from their headers, routed with the current routes."""
    report = RebuildReport()
    for path in paths:
        _register_incoming(ledger, path, decide, called_ae, report)
    return report
