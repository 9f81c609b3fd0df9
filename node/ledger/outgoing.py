"""The ledger's outgoing side: deliveries (claim, sent, failed, released), the attempt
history, and the row changes that the ledger's transactions share.

:class:`LedgerOutgoing` is a base of :class:`~mr2nst.node.ledger.store.Ledger`; its methods
are the ledger's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    GenerativeSelect,
    RowMapping,
    Table,
    and_,
    func,
    insert,
    or_,
    select,
    update,
)

from mr2nst.node.ledger.records import Clock, DeliveryJob, Payload, delivery_job_from_row
from mr2nst.node.ledger.schema import attempts, deliveries, instances
from mr2nst.node.ledger.states import DeliveryState, InstanceState

_Select = TypeVar("_Select", bound=GenerativeSelect)


class LedgerOutgoing:
    """Deliveries and history (see :class:`~mr2nst.node.ledger.store.Ledger`)."""

    engine: Engine
    clock: Clock

    def _locked(self, stmt: _Select, of: Table | None = None) -> _Select:
        """``stmt`` with ``FOR UPDATE SKIP LOCKED`` (of the rows of ``of``, default all)
        where the database has it (PostgreSQL)."""
        if self.engine.dialect.name == "postgresql":
            return stmt.with_for_update(skip_locked=True, of=of)
        return stmt

    # -- deliveries ------------------------------------------------------------------

    def claim_deliveries(
        self, owner: str, limit: int, lease_s: float, exclude: Iterable[int] = ()
    ) -> list[DeliveryJob]:
        """Atomically take up to ``limit`` due deliveries: -> ``sending``.

        Due: ``pending``, or ``failed`` and past its retry time, or ``sending`` under a lease
        that ran out. The instances' route priority goes first, then the oldest due.

        Args:
            owner: who holds the leases.
            limit: at most this many.
            lease_s: how long each lease lasts.
            exclude: delivery ids not to take (being sent in this process).

        Returns:
            The claimed deliveries (``attempts`` counts this one).
        """
        now = self.clock()
        due = or_(
            and_(
                deliveries.c.state.in_((DeliveryState.PENDING, DeliveryState.FAILED)),
                deliveries.c.next_attempt_at <= now,
            ),
            and_(deliveries.c.state == DeliveryState.SENDING, deliveries.c.lease_until < now),
        )
        candidates = self._locked(
            _DELIVERY_COLUMNS.where(due, deliveries.c.id.not_in(list(exclude)))
            .order_by(instances.c.priority.desc(), deliveries.c.next_attempt_at, deliveries.c.id)
            .limit(limit),
            of=deliveries,
        )
        claimed: list[DeliveryJob] = []
        with self.engine.begin() as conn:
            for row in conn.execute(candidates).mappings().all():
                got = conn.execute(
                    update(deliveries)
                    .where(deliveries.c.id == row["id"], due)
                    .values(
                        state=DeliveryState.SENDING,
                        lease_owner=owner,
                        lease_until=now + lease_s,
                        attempts=deliveries.c.attempts + 1,
                        updated_at=now,
                    )
                ).rowcount
                if got == 1:
                    claimed.append(delivery_job_from_row(row))
        return claimed

    def mark_sent(self, delivery_id: int, status: int, seconds: float | None = None) -> None:
        """Record a delivered instance.

        The instance becomes ``done`` once all its deliveries are sent, but only from
        ``transformed``: an original sent early while the method job still waits (or failed
        and is held) does not finish it.
        """
        now = self.clock()
        with self.engine.begin() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id)
                .values(
                    state=DeliveryState.SENT,
                    last_status=status,
                    error=None,
                    lease_owner=None,
                    lease_until=None,
                    updated_at=now,
                )
            )
            row = _delivery_row(conn, delivery_id)
            log_attempt(
                conn,
                row["instance_id"],
                now,
                "deliver",
                DeliveryState.SENT,
                None,
                delivery_id,
                row["destination"],
                status,
                seconds,
            )
            finish_if_all_sent(conn, row["instance_id"], now)

    def mark_delivery_failed(
        self,
        delivery_id: int,
        status: int | None,
        error: str,
        retry_at: float | None,
        seconds: float | None = None,
    ) -> DeliveryState:
        """Schedule a retry at ``retry_at``, or make the delivery ``dead`` when it is None.

        Returns:
            The new state: ``failed`` (a retry is scheduled) or ``dead``.
        """
        state = DeliveryState.FAILED if retry_at is not None else DeliveryState.DEAD
        now = self.clock()
        with self.engine.begin() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id)
                .values(
                    state=state,
                    last_status=status,
                    error=error[:2000],
                    lease_owner=None,
                    lease_until=None,
                    next_attempt_at=retry_at if retry_at is not None else now,
                    updated_at=now,
                )
            )
            row = _delivery_row(conn, delivery_id)
            log_attempt(
                conn,
                row["instance_id"],
                now,
                "deliver",
                state,
                error[:2000],
                delivery_id,
                row["destination"],
                status,
                seconds,
            )
        return state

    def release_delivery(self, delivery_id: int) -> None:
        """Hand back a claimed delivery that was not attempted (graceful stop)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, deliveries.c.state == DeliveryState.SENDING)
                .values(
                    state=DeliveryState.PENDING,
                    lease_owner=None,
                    lease_until=None,
                    attempts=deliveries.c.attempts - 1,
                    updated_at=self.clock(),
                )
            )

    # -- history ---------------------------------------------------------------------

    def history(self, instance_id: int) -> list[dict[str, Any]]:
        """Every recorded attempt of an instance, oldest first (kept across ``queue retry``).

        Returns:
            One dict per row of ``attempts``: ``id``, ``instance_id``, ``delivery_id`` (None
            for processing), ``at`` (epoch seconds), ``stage`` (``transform``, ``deliver``,
            ``fallback``, ``retry``), ``destination``, ``status`` (the peer's DICOM status),
            ``outcome``, ``reason`` and ``seconds``.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(attempts)
                .where(attempts.c.instance_id == instance_id)
                .order_by(attempts.c.id)
            )
            return [dict(r) for r in rows.mappings()]


def add_delivery(
    conn: Connection, instance_id: int, dest: str, payload: Payload, now: float
) -> int:
    """Insert a pending delivery of ``payload`` to ``dest``; returns its id."""
    result = conn.execute(
        insert(deliveries).values(
            instance_id=instance_id,
            destination=dest,
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=now,
            updated_at=now,
            payload=payload,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def delivery_ids(conn: Connection, instance_id: int) -> dict[str, int]:
    """The instance's deliveries: destination -> delivery id."""
    rows = conn.execute(
        select(deliveries.c.destination, deliveries.c.id).where(
            deliveries.c.instance_id == instance_id
        )
    )
    return {str(dest): int(did) for dest, did in rows}


def _delivery_row(conn: Connection, delivery_id: int) -> RowMapping:
    """The instance id and destination of a delivery."""
    return (
        conn.execute(
            select(deliveries.c.instance_id, deliveries.c.destination).where(
                deliveries.c.id == delivery_id
            )
        )
        .mappings()
        .one()
    )


def finish_if_all_sent(conn: Connection, instance_id: int, now: float) -> InstanceState:
    """``transformed`` -> ``done`` when every delivery of the instance is sent; the state.

    The instance row is locked first (PostgreSQL), so a delivery that a concurrent
    transaction adds to it is counted.
    """
    conn.execute(select(instances.c.id).where(instances.c.id == instance_id).with_for_update())
    unsent = conn.execute(
        select(func.count())
        .select_from(deliveries)
        .where(deliveries.c.instance_id == instance_id, deliveries.c.state != DeliveryState.SENT)
    ).scalar_one()
    if unsent == 0:
        conn.execute(
            update(instances)
            .where(instances.c.id == instance_id, instances.c.state == InstanceState.TRANSFORMED)
            .values(state=InstanceState.DONE, updated_at=now)
        )
    state = conn.execute(
        select(instances.c.state).where(instances.c.id == instance_id)
    ).scalar_one()
    return InstanceState(state)


def log_attempt(
    conn: Connection,
    instance_id: int,
    at: float,
    stage: str,
    outcome: str,
    reason: str | None = None,
    delivery_id: int | None = None,
    destination: str | None = None,
    status: int | None = None,
    seconds: float | None = None,
) -> None:
    """Append one row to the instance's attempt history."""
    conn.execute(
        insert(attempts).values(
            instance_id=instance_id,
            delivery_id=delivery_id,
            at=at,
            stage=stage,
            destination=destination,
            status=status,
            outcome=str(outcome),
            reason=reason,
            seconds=None if seconds is None else round(seconds, 3),
        )
    )


def adopt_v1_forwards(conn: Connection, now: float) -> None:
    """Forward instances a v1 ledger left for a worker go to the forwarder lane instead."""
    rows = conn.execute(
        select(instances.c.id, instances.c.destinations).where(
            instances.c.lane == "forward",
            instances.c.state.in_((InstanceState.RECEIVED, InstanceState.PROCESSING)),
        )
    ).all()
    for job_id, dests in rows:
        have = delivery_ids(conn, job_id)
        for dest in json.loads(dests):
            if dest not in have:
                add_delivery(conn, job_id, dest, "original", now)
        conn.execute(
            update(instances)
            .where(instances.c.id == job_id)
            .values(
                state=InstanceState.TRANSFORMED, lease_owner=None, lease_until=None, updated_at=now
            )
        )


# What a claimed delivery needs: the delivery, and its instance's files and UIDs.
_DELIVERY_COLUMNS = select(
    deliveries.c.id,
    deliveries.c.instance_id,
    deliveries.c.destination,
    deliveries.c.attempts,
    deliveries.c.payload,
    instances.c.spool_path,
    instances.c.output_path,
    instances.c.sop_instance_uid,
    instances.c.study_uid,
    instances.c.series_uid,
    instances.c.route,
).join(instances, instances.c.id == deliveries.c.instance_id)
