"""The durable ledger: one row per received instance, one per (instance, destination).

All state changes are single transactions. Claims are compare-and-set updates, so any
number of workers or forwarders (in several processes or on several nodes sharing a
PostgreSQL ledger) can claim work concurrently; on PostgreSQL the candidate rows are
selected ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    create_engine,
    event,
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
from mr2nst.node.ledger.outgoing import (
    LedgerOutgoing,
    add_delivery,
    adopt_v1_forwards,
    delivery_ids,
    finish_if_all_sent,
    log_attempt,
)
from mr2nst.node.ledger.records import (
    WORKER_LANES,
    Clock,
    DeliveryJob,
    Job,
    Received,
    job_from_row,
)
from mr2nst.node.ledger.schema import instances, migrate
from mr2nst.node.ledger.states import InstanceState


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    """On each new SQLite connection: WAL, durable commits, a busy timeout, foreign keys."""
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed transaction survives power loss, which an acknowledged C-STORE needs.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Ledger(LedgerAdmin, LedgerOutgoing):
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
                if 0 < migrate(conn, clock()) < 2:  # from v1: forwards move to their lane
                    adopt_v1_forwards(conn, clock())
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
        """Insert the row for a received instance, and its first deliveries, in one transaction.

        A ``forward`` instance is recorded ``transformed`` with one pending delivery of the
        original per destination: it goes straight to the forwarder, no worker claims it. A
        ``normalize`` instance gets its ``forward_original`` deliveries here too; its method
        job waits for a worker.

        Returns:
            The instance's job id.
        """
        now = self.clock()
        lane = rec.lane
        original_to = rec.destinations if lane == "forward" else rec.forward_original
        state = InstanceState.TRANSFORMED if lane == "forward" else rec.state
        values = {
            k: v
            for k, v in rec.__dict__.items()
            if k not in ("destinations", "fallback_destinations", "forward_original", "state")
        }
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(instances).values(
                    **values,
                    state=state,
                    lane=lane,
                    destinations=json.dumps(list(rec.destinations)),
                    fallback_destinations=json.dumps(list(rec.fallback_destinations)),
                    attempts=0,
                    received_at=now,
                    updated_at=now,
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            job_id = int(key[0])
            for dest in original_to:
                add_delivery(conn, job_id, dest, "original", now)
            return job_id

    # -- processing jobs -------------------------------------------------------------

    def claim_job(
        self, owner: str, lease_s: float, lanes: Sequence[str] = WORKER_LANES
    ) -> Job | None:
        """Atomically take the next runnable job of ``lanes``: ``received`` ->
        ``processing``; the highest route priority first, then the oldest.

        Runnable: ``received`` and not waiting for a retry, or ``processing`` under a lease
        that ran out (its worker died).

        Args:
            owner: who holds the lease (host, process, worker).
            lease_s: how long the lease lasts unless renewed.
            lanes: the lanes this worker serves (a light worker: only ``light``).

        Returns:
            The claimed job (``attempts`` counts this one), or None when none is runnable.
        """
        now = self.clock()
        runnable = and_(
            instances.c.lane.in_(list(lanes)),
            or_(
                and_(
                    instances.c.state == InstanceState.RECEIVED,
                    or_(instances.c.lease_until.is_(None), instances.c.lease_until <= now),
                ),
                and_(instances.c.state == InstanceState.PROCESSING, instances.c.lease_until < now),
            ),
        )
        order = (instances.c.priority.desc(), instances.c.id)
        for _ in range(8):
            with self.engine.begin() as conn:
                row = (
                    conn.execute(
                        self._locked(select(instances).where(runnable).order_by(*order).limit(1))
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
        seconds: float | None = None,
    ) -> bool:
        """Record the output and create one pending delivery per destination, atomically.

        The job becomes ``transformed``, or ``done`` when nothing is left to send (no
        destination, and any original already sent). The attempt goes into the history.

        Returns:
            False when ``owner`` lost the lease; nothing is recorded then.
        """
        now = self.clock()
        with self.engine.begin() as conn:
            done = conn.execute(
                update(instances)
                .where(self._owned(job_id, owner))
                .values(
                    state=InstanceState.TRANSFORMED,
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
            have = delivery_ids(conn, job_id)
            for dest in destinations:
                if dest not in have:
                    add_delivery(conn, job_id, dest, "derived", now)
            log_attempt(conn, job_id, now, "transform", "transformed", seconds=seconds)
            finish_if_all_sent(conn, job_id, now)
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
        reason: str | None = None,
        seconds: float | None = None,
    ) -> InstanceState:
        """Requeue a job to run after ``retry_in_s``, or give it up.

        A job is given up when the error is ``permanent`` or ``max_attempts`` attempts were
        made. Then, when the instance has fallback destinations, the original is sent there
        instead (pending ``original`` deliveries to those that have none yet; the instance
        becomes ``transformed``, ``done`` once they are sent) and ``fallback_reason``
        records why; without any (``on_failure = "hold"``) it becomes ``failed``.

        Args:
            job_id: the claimed job.
            owner: the lease holder.
            error: what went wrong (stored, cut to 2000 characters).
            permanent: retrying cannot help: give up at once.
            max_attempts: give up once this many attempts were made.
            retry_in_s: delay before a requeued job is runnable again.
            reason: why it is given up, as ``"<code>: <detail>"``; default
                ``"method.refused: <error>"`` when permanent, else
                ``"method.failed: <error>"`` (attempts spent).
            seconds: how long the attempt took (for the history).

        Returns:
            The new state: ``received`` (requeued), ``failed`` (held), ``transformed`` or
            ``done`` (fell back); ``processing`` when ``owner`` lost the lease (nothing is
            recorded then).
        """
        now = self.clock()
        with self.engine.begin() as conn:
            # Take the row (and the write lock) first, so the lease cannot change under us.
            owned = conn.execute(
                update(instances)
                .where(self._owned(job_id, owner))
                .values(lease_owner=None, updated_at=now)
            ).rowcount
            if owned != 1:
                return InstanceState.PROCESSING  # lease lost: another worker owns it now
            row = (
                conn.execute(
                    select(instances.c.attempts, instances.c.fallback_destinations).where(
                        instances.c.id == job_id
                    )
                )
                .mappings()
                .one()
            )
            error = error[:2000]
            if not permanent and row["attempts"] < max_attempts:
                self._set_instance(
                    conn,
                    job_id,
                    state=InstanceState.RECEIVED,
                    error=error,
                    lease_until=now + retry_in_s,
                )
                log_attempt(conn, job_id, now, "transform", "requeued", error, seconds=seconds)
                return InstanceState.RECEIVED
            why = (reason or f"method.{'refused' if permanent else 'failed'}: {error}")[:2000]
            fallback = json.loads(row["fallback_destinations"] or "[]")
            if not fallback:
                self._set_instance(
                    conn, job_id, state=InstanceState.FAILED, error=error, lease_until=None
                )
                log_attempt(conn, job_id, now, "transform", "failed", why, seconds=seconds)
                return InstanceState.FAILED
            self._set_instance(
                conn,
                job_id,
                state=InstanceState.TRANSFORMED,
                error=error,
                lease_until=None,
                fallback_reason=why,
            )
            log_attempt(conn, job_id, now, "transform", "fallback", why, seconds=seconds)
            have = delivery_ids(conn, job_id)
            for dest in fallback:
                delivery_id = have.get(dest) or add_delivery(conn, job_id, dest, "original", now)
                log_attempt(
                    conn, job_id, now, "fallback", "forward-original", why, delivery_id, dest
                )
            return finish_if_all_sent(conn, job_id, now)

    def _set_instance(self, conn: Connection, job_id: int, **values: object) -> None:
        """Update a job's row and hand back its lease (the caller checked it owns it)."""
        conn.execute(
            update(instances)
            .where(instances.c.id == job_id)
            .values(**values, lease_owner=None, updated_at=self.clock())
        )

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


__all__ = ["Clock", "DeliveryJob", "Job", "Ledger", "Received"]
