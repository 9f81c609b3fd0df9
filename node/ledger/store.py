"""The durable ledger: one row per received instance, one per (instance, destination).

All state changes are single transactions. Claims are compare-and-set updates, so any
number of workers or forwarders (in several processes or on several nodes sharing a
PostgreSQL ledger) can claim work concurrently; on PostgreSQL the candidate rows are
selected ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import TypeVar

from sqlalchemy import (
    ColumnElement,
    Engine,
    GenerativeSelect,
    and_,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from mr2nst.node.errors import LedgerError
from mr2nst.node.ledger.admin import LedgerAdmin
from mr2nst.node.ledger.records import (
    Clock,
    DeliveryJob,
    Job,
    Received,
    delivery_job_from_row,
    job_from_row,
)
from mr2nst.node.ledger.schema import deliveries, instances, migrate
from mr2nst.node.ledger.states import DeliveryState, InstanceState

_Select = TypeVar("_Select", bound=GenerativeSelect)


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    """On each new SQLite connection: WAL, durable commits, a busy timeout, foreign keys."""
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed transaction survives power loss, which an acknowledged C-STORE needs.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Ledger(LedgerAdmin):
    """Operations on the ledger. Thread-safe; share one per process.

    Args:
        engine: the SQLAlchemy engine of a migrated ledger (see :meth:`open`).
        clock: the time source of every timestamp, lease and retry time.
    """

    def __init__(self, engine: Engine, clock: Clock = time.time) -> None:
        self.engine = engine
        self.clock = clock

    @classmethod
    def open(cls, url: str, clock: Clock = time.time) -> Ledger:
        """Connect, apply pending migrations and return the ledger.

        Args:
            url: a SQLAlchemy URL; ``postgresql://`` URLs use psycopg 3 (the ``postgres``
                extra).
            clock: the time source (see :class:`Ledger`).

        Raises:
            LedgerError: the URL is unusable, the database cannot be opened, or its schema
                is unknown or newer than this mr2nst's.
        """
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        shown = url.split("@")[-1]  # never print a password
        try:
            engine = create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise LedgerError(
                f"cannot use ledger URL {shown!r}: {exc.__class__.__name__}: {exc}"
            ) from None
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_pragmas)
        try:
            with engine.begin() as conn:
                migrate(conn, clock())
        except SQLAlchemyError as exc:
            engine.dispose()
            reason = str(exc).splitlines()[0]
            raise LedgerError(
                f"cannot open ledger {shown!r}: {exc.__class__.__name__}: {reason}"
            ) from None
        return cls(engine, clock)

    def close(self) -> None:
        """Close the ledger's connections."""
        self.engine.dispose()

    # -- receive ---------------------------------------------------------------------

    def record(self, rec: Received) -> int:
        """Insert the row for a received instance in one transaction.

        Returns:
            The instance's job id.
        """
        now = self.clock()
        values = {k: v for k, v in rec.__dict__.items() if k != "destinations"}
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(instances).values(
                    **values,
                    destinations=json.dumps(list(rec.destinations)),
                    attempts=0,
                    received_at=now,
                    updated_at=now,
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    # -- processing jobs -------------------------------------------------------------

    def _locked(self, stmt: _Select) -> _Select:
        """``stmt`` with ``FOR UPDATE SKIP LOCKED`` where the database has it (PostgreSQL)."""
        if self.engine.dialect.name == "postgresql":
            return stmt.with_for_update(skip_locked=True)
        return stmt

    def claim_job(self, owner: str, lease_s: float) -> Job | None:
        """Atomically take the oldest runnable job: ``received`` -> ``processing``.

        Runnable: ``received`` and not waiting for a retry, or ``processing`` under a lease
        that ran out (its worker died).

        Args:
            owner: who holds the lease (host, process, worker).
            lease_s: how long the lease lasts unless renewed.

        Returns:
            The claimed job (``attempts`` counts this one), or None when none is runnable.
        """
        now = self.clock()
        runnable = or_(
            and_(
                instances.c.state == InstanceState.RECEIVED,
                or_(instances.c.lease_until.is_(None), instances.c.lease_until <= now),
            ),
            and_(instances.c.state == InstanceState.PROCESSING, instances.c.lease_until < now),
        )
        for _ in range(8):
            with self.engine.begin() as conn:
                row = (
                    conn.execute(
                        self._locked(
                            select(instances).where(runnable).order_by(instances.c.id).limit(1)
                        )
                    )
                    .mappings()
                    .first()
                )
                if row is None:
                    return None
                claimed = conn.execute(
                    update(instances)
                    .where(instances.c.id == row["id"], runnable)
                    .values(
                        state=InstanceState.PROCESSING,
                        lease_owner=owner,
                        lease_until=now + lease_s,
                        attempts=instances.c.attempts + 1,
                        updated_at=now,
                    )
                ).rowcount
                if claimed == 1:
                    return job_from_row(row)
        return None

    def _owned(self, job_id: int, owner: str) -> ColumnElement[bool]:
        """The job row while ``owner`` holds its lease."""
        return and_(
            instances.c.id == job_id,
            instances.c.state == InstanceState.PROCESSING,
            instances.c.lease_owner == owner,
        )

    def renew_lease(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease on a job it is processing to ``lease_s`` from now.

        Args:
            job_id: the claimed job.
            owner: the lease holder given to :meth:`claim_job`.
            lease_s: seconds from now until the lease runs out.

        Returns:
            False when ``owner`` no longer holds the job (the lease ran out and another
            worker claimed it); its result must then not be recorded.
        """
        now = self.clock()
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(instances)
                    .where(self._owned(job_id, owner))
                    .values(lease_until=now + lease_s, updated_at=now)
                ).rowcount
            )

    def mark_transformed(
        self,
        job_id: int,
        owner: str,
        *,
        output_path: str,
        out_series_uid: str | None,
        out_sop_uid: str | None,
        destinations: Sequence[str],
    ) -> bool:
        """Record the output and create one pending delivery per destination, atomically.

        The job becomes ``transformed`` (``done`` when there is no destination).

        Returns:
            False when ``owner`` lost the lease; nothing is recorded then.
        """
        now = self.clock()
        with self.engine.begin() as conn:
            done = conn.execute(
                update(instances)
                .where(self._owned(job_id, owner))
                .values(
                    state=InstanceState.TRANSFORMED if destinations else InstanceState.DONE,
                    output_path=output_path,
                    out_series_uid=out_series_uid,
                    out_sop_uid=out_sop_uid,
                    lease_owner=None,
                    lease_until=None,
                    error=None,
                    updated_at=now,
                )
            ).rowcount
            if done != 1:
                return False  # lease lost: another worker owns it now
            for dest in destinations:
                conn.execute(
                    insert(deliveries).values(
                        instance_id=job_id,
                        destination=dest,
                        state=DeliveryState.PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        updated_at=now,
                    )
                )
        return True

    def mark_job_error(
        self,
        job_id: int,
        owner: str,
        error: str,
        *,
        permanent: bool,
        max_attempts: int,
        retry_in_s: float,
    ) -> InstanceState:
        """Give up on a job (``failed``) or requeue it to run after ``retry_in_s``.

        Args:
            job_id: the claimed job.
            owner: the lease holder.
            error: why it failed (stored, cut to 2000 characters).
            permanent: retrying cannot help: fail at once.
            max_attempts: fail once this many attempts were made.
            retry_in_s: delay before a requeued job is runnable again.

        Returns:
            The new state: ``failed`` or ``received``.
        """
        now = self.clock()
        with self.engine.begin() as conn:
            attempts = (
                conn.execute(select(instances.c.attempts).where(instances.c.id == job_id)).scalar()
                or 0
            )
            state = (
                InstanceState.FAILED
                if permanent or attempts >= max_attempts
                else InstanceState.RECEIVED
            )
            conn.execute(
                update(instances)
                .where(self._owned(job_id, owner))
                .values(
                    state=state,
                    error=error[:2000],
                    lease_owner=None,
                    lease_until=None if state == InstanceState.FAILED else now + retry_in_s,
                    updated_at=now,
                )
            )
        return state

    def set_paths(
        self, job_id: int, *, spool_path: str | None = None, output_path: str | None = None
    ) -> None:
        """Record where a job's files lie now (e.g. its source after a move to dead/).

        Args:
            job_id: the instance.
            spool_path: the received file's new path; None leaves it as it is.
            output_path: the output file's new path; None leaves it as it is.
        """
        values: dict[str, object] = {"updated_at": self.clock()}
        if spool_path is not None:
            values["spool_path"] = spool_path
        if output_path is not None:
            values["output_path"] = output_path
        with self.engine.begin() as conn:
            conn.execute(update(instances).where(instances.c.id == job_id).values(**values))

    def release_job(self, job_id: int, owner: str) -> None:
        """Hand an unfinished job back (graceful stop), without counting the attempt."""
        with self.engine.begin() as conn:
            conn.execute(
                update(instances)
                .where(self._owned(job_id, owner))
                .values(
                    state=InstanceState.RECEIVED,
                    lease_owner=None,
                    lease_until=None,
                    attempts=instances.c.attempts - 1,
                    updated_at=self.clock(),
                )
            )

    # -- deliveries ------------------------------------------------------------------

    def claim_deliveries(
        self, owner: str, limit: int, lease_s: float, exclude: Iterable[int] = ()
    ) -> list[DeliveryJob]:
        """Atomically take up to ``limit`` due deliveries: -> ``sending``.

        Due: ``pending``, or ``failed`` and past its retry time, or ``sending`` under a lease
        that ran out.

        Args:
            owner: who holds the leases.
            limit: at most this many.
            lease_s: how long each lease lasts.
            exclude: delivery ids not to take (being sent in this process).

        Returns:
            The claimed deliveries, oldest due first (``attempts`` counts this one).
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
            .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
            .limit(limit)
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

    def mark_sent(self, delivery_id: int, status: int) -> None:
        """Record a delivered instance; the instance is ``done`` once all its deliveries are."""
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
            instance_id = conn.execute(
                select(deliveries.c.instance_id).where(deliveries.c.id == delivery_id)
            ).scalar_one()
            unsent = conn.execute(
                select(func.count())
                .select_from(deliveries)
                .where(
                    deliveries.c.instance_id == instance_id,
                    deliveries.c.state != DeliveryState.SENT,
                )
            ).scalar_one()
            if unsent == 0:
                conn.execute(
                    update(instances)
                    .where(instances.c.id == instance_id)
                    .values(state=InstanceState.DONE, updated_at=now)
                )

    def mark_delivery_failed(
        self, delivery_id: int, status: int | None, error: str, retry_at: float | None
    ) -> DeliveryState:
        """Schedule a retry at ``retry_at``, or make the delivery ``dead`` when it is None.

        Returns:
            The new state: ``failed`` (a retry is scheduled) or ``dead``.
        """
        state = DeliveryState.FAILED if retry_at is not None else DeliveryState.DEAD
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
                    next_attempt_at=retry_at if retry_at is not None else self.clock(),
                    updated_at=self.clock(),
                )
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


# What a claimed delivery needs: the delivery, and its instance's output and UIDs.
_DELIVERY_COLUMNS = select(
    deliveries.c.id,
    deliveries.c.instance_id,
    deliveries.c.destination,
    deliveries.c.attempts,
    instances.c.output_path,
    instances.c.sop_instance_uid,
    instances.c.study_uid,
    instances.c.series_uid,
    instances.c.route,
).join(instances, instances.c.id == deliveries.c.instance_id)


__all__ = ["Clock", "DeliveryJob", "Job", "Ledger", "Received"]
