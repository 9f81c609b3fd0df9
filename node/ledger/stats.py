"""Read-only questions to the ledger for metrics and ``mr2nst status``.

Queues per lane and per destination (depth and the oldest job), the last error per
destination, transforms by method and outcome, their durations, and fallbacks by reason.
Every function takes an open connection, so a caller asks several in one go. They work on
SQLite and PostgreSQL and count what every process (and every node sharing a PostgreSQL
ledger) recorded, not only the caller's own work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, case, func, or_, select

from mr2nst.node.ledger.schema import attempts, deliveries, instances
from mr2nst.node.ledger.states import DeliveryState, InstanceState

#: The lanes that queue work (``none``: dropped or unrouted, nothing to do).
LANES = ("method", "light", "forward")
#: Deliveries still to be sent: due, being sent, or waiting to retry (not ``dead``).
OPEN_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.FAILED)
#: Instances still waiting for, or at, a worker (also waiting to retry processing).
WAITING_STATES = (InstanceState.RECEIVED, InstanceState.PROCESSING)
#: Upper bounds (seconds) of the transform duration histogram's buckets.
TRANSFORM_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
#: The outcome of a delivery attempt that reached its destination.
SENT = "sent"


@dataclass(frozen=True)
class Queue:
    """The work waiting in one lane or for one destination.

    Attributes:
        depth: how many jobs.
        oldest_received_at: when the oldest of them was received (None when empty).
    """

    depth: int = 0
    oldest_received_at: float | None = None

    def oldest_age_s(self, now: float) -> float:
        """Seconds since the oldest job was received (0 when the queue is empty)."""
        return 0.0 if self.oldest_received_at is None else max(0.0, now - self.oldest_received_at)


@dataclass(frozen=True)
class LastError:
    """The latest failed delivery attempt to one destination.

    Attributes:
        at: when it happened.
        status: the peer's DICOM status, if it answered.
        outcome: what the attempt led to (``failed`` = will retry, ``dead``, ...).
        reason: what went wrong.
    """

    at: float
    status: int | None
    outcome: str
    reason: str


@dataclass(frozen=True)
class Durations:
    """A histogram of attempt durations: cumulative counts per bucket bound, count and sum."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    total_s: float


def _queued() -> ColumnElement[bool]:
    """An instance not yet settled: at or waiting for a worker, or with a delivery to send."""
    open_ids = select(deliveries.c.instance_id).where(deliveries.c.state.in_(OPEN_DELIVERY_STATES))
    return or_(instances.c.state.in_(WAITING_STATES), instances.c.id.in_(open_ids))


def lane_queues(conn: Connection) -> dict[str, Queue]:
    """Per lane (every one of :data:`LANES`, 0 when empty): instances not yet settled.

    An instance counts from its receipt until it is processed and every delivery that is
    still to be sent is sent; dead deliveries and failed jobs wait for an admin, not in
    a queue.
    """
    out = {lane: Queue() for lane in LANES}
    query = (
        select(instances.c.lane, func.count(), func.min(instances.c.received_at))
        .where(instances.c.lane != "none", _queued())
        .group_by(instances.c.lane)
    )
    for lane, depth, oldest in conn.execute(query):
        out[str(lane)] = Queue(int(depth), None if oldest is None else float(oldest))
    return out


def destination_queues(conn: Connection) -> dict[str, Queue]:
    """Per destination with work: deliveries still to be sent, aged from the receipt."""
    query = (
        select(deliveries.c.destination, func.count(), func.min(instances.c.received_at))
        .select_from(deliveries.join(instances, deliveries.c.instance_id == instances.c.id))
        .where(deliveries.c.state.in_(OPEN_DELIVERY_STATES))
        .group_by(deliveries.c.destination)
    )
    return {
        str(dest): Queue(int(depth), None if oldest is None else float(oldest))
        for dest, depth, oldest in conn.execute(query)
    }


def dead_deliveries(conn: Connection) -> dict[str, int]:
    """Per destination with any: deliveries given up (waiting for ``queue retry``)."""
    query = (
        select(deliveries.c.destination, func.count())
        .where(deliveries.c.state == DeliveryState.DEAD)
        .group_by(deliveries.c.destination)
    )
    return {str(dest): int(n) for dest, n in conn.execute(query)}


def last_errors(conn: Connection) -> dict[str, LastError]:
    """Per destination that ever failed: its latest failed delivery attempt.

    Read from the attempt history, and from the deliveries' own last error (the only
    record before the history existed); the later of the two wins.
    """
    out: dict[str, LastError] = {}
    latest = (
        select(func.max(attempts.c.id))
        .where(attempts.c.stage == "deliver", attempts.c.outcome != SENT)
        .group_by(attempts.c.destination)
    )
    rows = conn.execute(
        select(
            attempts.c.destination,
            attempts.c.at,
            attempts.c.status,
            attempts.c.outcome,
            attempts.c.reason,
        ).where(attempts.c.id.in_(latest), attempts.c.destination.is_not(None))
    )
    for dest, at, status, outcome, reason in rows:
        out[str(dest)] = LastError(float(at), status, str(outcome), reason or "")
    newest = (
        select(deliveries.c.destination, func.max(deliveries.c.updated_at).label("at"))
        .where(deliveries.c.error.is_not(None))
        .group_by(deliveries.c.destination)
        .subquery()
    )
    failed = conn.execute(
        select(
            deliveries.c.destination,
            deliveries.c.updated_at,
            deliveries.c.last_status,
            deliveries.c.state,
            deliveries.c.error,
        )
        .join(
            newest,
            (deliveries.c.destination == newest.c.destination)
            & (deliveries.c.updated_at == newest.c.at),
        )
        .where(deliveries.c.error.is_not(None))
    )
    for dest, at, status, state, error in failed:
        known = out.get(str(dest))
        if known is None or known.at < float(at):
            out[str(dest)] = LastError(float(at), status, str(state), str(error))
    return out


def transform_counts(conn: Connection) -> dict[tuple[str, str], int]:
    """Processing attempts by (method, outcome), from the attempt history."""
    query = (
        select(instances.c.method, attempts.c.outcome, func.count())
        .select_from(attempts.join(instances, attempts.c.instance_id == instances.c.id))
        .where(attempts.c.stage == "transform")
        .group_by(instances.c.method, attempts.c.outcome)
    )
    return {(method or "", str(outcome)): int(n) for method, outcome, n in conn.execute(query)}


def transform_durations(
    conn: Connection, buckets: Sequence[float] = TRANSFORM_BUCKETS
) -> dict[tuple[str, str], Durations]:
    """Processing attempt durations by (method, outcome): a histogram counted in SQL."""
    seconds = attempts.c.seconds
    query = (
        select(
            instances.c.method,
            attempts.c.outcome,
            func.count(),
            func.coalesce(func.sum(seconds), 0.0),
            *(func.sum(case((seconds <= bound, 1), else_=0)) for bound in buckets),
        )
        .select_from(attempts.join(instances, attempts.c.instance_id == instances.c.id))
        .where(attempts.c.stage == "transform", seconds.is_not(None))
        .group_by(instances.c.method, attempts.c.outcome)
    )
    out: dict[tuple[str, str], Durations] = {}
    for method, outcome, count, total, *cumulative in conn.execute(query):
        out[(method or "", str(outcome))] = Durations(
            tuple((bound, int(n or 0)) for bound, n in zip(buckets, cumulative, strict=True)),
            int(count),
            float(total),
        )
    return out


def _code_of(conn: Connection, reason: ColumnElement[Any]) -> ColumnElement[Any]:
    """SQL for the code of a ``"<code>: <detail>"`` reason (the text before the first ``:``)."""
    where = (
        func.strpos(reason, ":")
        if conn.dialect.name == "postgresql"
        else func.instr(reason, ":")  # SQLite
    )
    return case((where > 0, func.substr(reason, 1, where - 1)), else_=reason)


def fallback_counts(conn: Connection) -> dict[str, int]:
    """Instances sent on as the original instead of an output, by reason code.

    The codes are those of ``instances.fallback_reason`` (``"<code>: <detail>"``), e.g.
    ``safety.mask_overlap`` or ``method.refused``.
    """
    code = _code_of(conn, instances.c.fallback_reason).label("code")
    query = (
        select(code, func.count()).where(instances.c.fallback_reason.is_not(None)).group_by(code)
    )
    return {str(c).strip(): int(n) for c, n in conn.execute(query)}


def safety_failures(conn: Connection) -> dict[str, int]:
    """Outputs the safety gate stopped, by failed check (``safety.*`` codes).

    Counted from the processing attempts whose reason carries a ``safety.`` code, so a
    route that holds (``on_failure = "hold"``) counts as well as one that falls back.
    """
    code = _code_of(conn, attempts.c.reason).label("code")
    query = (
        select(code, func.count())
        .where(attempts.c.stage == "transform", attempts.c.reason.like("safety.%"))
        .group_by(code)
    )
    return {str(c).strip(): int(n) for c, n in conn.execute(query)}


def history(conn: Connection, instance_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """The attempt history of each instance, oldest first (kept across ``queue retry``)."""
    if not instance_ids:
        return {}
    query = (
        select(
            attempts.c.instance_id,
            attempts.c.at,
            attempts.c.stage,
            attempts.c.destination,
            attempts.c.status,
            attempts.c.outcome,
            attempts.c.reason,
            attempts.c.seconds,
        )
        .where(attempts.c.instance_id.in_(instance_ids))
        .order_by(attempts.c.instance_id, attempts.c.id)
    )
    out: dict[int, list[dict[str, Any]]] = {}
    for row in conn.execute(query).mappings():
        entry = dict(row)
        out.setdefault(int(entry.pop("instance_id")), []).append(entry)
    return out
