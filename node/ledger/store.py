"""The durable ledger: one row per received instance, one per (instance, destination).

All state changes are single transactions. Claims are compare-and-set updates, so any
number of workers or forwarders (in several processes or on several nodes sharing a
PostgreSQL ledger) can claim work concurrently; on PostgreSQL the candidate rows are
selected ``FOR UPDATE SKIP LOCKED``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, create_engine, event, func, insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from mr2nst.node.errors import LedgerError
from mr2nst.node.ledger.schema import deliveries, instances, migrate
from mr2nst.node.ledger.states import DeliveryState, InstanceState

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
    action: str
    method: str | None
    destinations: tuple[str, ...]
    state: str
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


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed transaction survives power loss, which an acknowledged C-STORE needs.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class Ledger:
    """Operations on the ledger. Thread-safe; share one per process."""

    def __init__(self, engine: Engine, clock: Clock = time.time) -> None:
        self.engine = engine
        self.clock = clock

    @classmethod
    def open(cls, url: str, clock: Clock = time.time) -> Ledger:
        """Connect, apply pending migrations and return the ledger.

        ``postgresql://`` URLs use psycopg 3 (the ``postgres`` extra).
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
        self.engine.dispose()

    # -- receive ---------------------------------------------------------------------

    def record(self, rec: Received) -> int:
        """Insert the row for a received instance in one transaction; return its job id."""
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

    def _locked(self, stmt: Any) -> Any:
        if self.engine.dialect.name == "postgresql":
            return stmt.with_for_update(skip_locked=True)
        return stmt

    def claim_job(self, owner: str, lease_s: float) -> Job | None:
        """Atomically take the oldest runnable job: ``received`` -> ``processing``."""
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
        return None

    def _owned(self, job_id: int, owner: str) -> Any:
        return and_(
            instances.c.id == job_id,
            instances.c.state == InstanceState.PROCESSING,
            instances.c.lease_owner == owner,
        )

    def renew_lease(self, job_id: int, owner: str, lease_s: float) -> bool:
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
        """Record the output and create one pending delivery per destination, atomically."""
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
    ) -> str:
        """Give up (``failed``) or requeue after ``retry_in_s``. Returns the new state."""
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
        values: dict[str, Any] = {"updated_at": self.clock()}
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
        """Atomically take up to ``limit`` due deliveries: -> ``sending``."""
        now = self.clock()
        due = or_(
            and_(
                deliveries.c.state.in_((DeliveryState.PENDING, DeliveryState.FAILED)),
                deliveries.c.next_attempt_at <= now,
            ),
            and_(deliveries.c.state == DeliveryState.SENDING, deliveries.c.lease_until < now),
        )
        claimed: list[DeliveryJob] = []
        with self.engine.begin() as conn:
            rows = (
                conn.execute(
                    self._locked(
                        select(
                            deliveries.c.id,
                            deliveries.c.instance_id,
                            deliveries.c.destination,
                            deliveries.c.attempts,
                            instances.c.output_path,
                            instances.c.sop_instance_uid,
                            instances.c.study_uid,
                            instances.c.series_uid,
                            instances.c.route,
                        )
                        .join(instances, instances.c.id == deliveries.c.instance_id)
                        .where(due, deliveries.c.id.not_in(list(exclude)))
                        .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
                        .limit(limit)
                    )
                )
                .mappings()
                .all()
            )
            for row in rows:
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
                    claimed.append(
                        DeliveryJob(
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
                    )
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
    ) -> str:
        """Schedule a retry at ``retry_at``, or make the delivery ``dead`` when it is None."""
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

    # -- admin (mr2nst queue) --------------------------------------------------------

    def retry(self, ids: Sequence[int] = ()) -> int:
        """Revive dead deliveries and failed jobs (all, or the given job ids)."""
        now = self.clock()
        with self.engine.begin() as conn:
            dq = update(deliveries).where(deliveries.c.state == DeliveryState.DEAD)
            jq = update(instances).where(
                instances.c.state == InstanceState.FAILED, instances.c.spool_path.is_not(None)
            )
            if ids:
                dq = dq.where(deliveries.c.instance_id.in_(ids))
                jq = jq.where(instances.c.id.in_(ids))
            n = conn.execute(
                dq.values(
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    error=None,
                    updated_at=now,
                )
            ).rowcount
            n += conn.execute(
                jq.values(
                    state=InstanceState.RECEIVED,
                    attempts=0,
                    lease_until=None,
                    error=None,
                    updated_at=now,
                )
            ).rowcount
            if n:
                conn.execute(
                    update(instances)
                    .where(
                        instances.c.id.in_(
                            select(deliveries.c.instance_id).where(
                                deliveries.c.state == DeliveryState.PENDING
                            )
                        )
                    )
                    .where(instances.c.state == InstanceState.DONE)
                    .values(state=InstanceState.TRANSFORMED, updated_at=now)
                )
        return int(n)

    def purge(self, ids: Sequence[int] = ()) -> list[dict[str, Any]]:
        """Give up dead deliveries and failed jobs for good; return the rows whose files may go."""
        now = self.clock()
        with self.engine.begin() as conn:
            dq = update(deliveries).where(deliveries.c.state == DeliveryState.DEAD)
            jq = select(instances.c.id).where(instances.c.state == InstanceState.FAILED)
            if ids:
                dq = dq.where(deliveries.c.instance_id.in_(ids))
                jq = jq.where(instances.c.id.in_(ids))
            conn.execute(dq.values(state=DeliveryState.PURGED, updated_at=now))
            job_ids = [r[0] for r in conn.execute(jq)]
            conn.execute(
                update(instances)
                .where(instances.c.id.in_(job_ids))
                .values(error="purged by admin", updated_at=now)
            )
        return self.settled_files(older_than=now + 1, only_ids=ids, include_failed=True)

    def settled_files(
        self, older_than: float, only_ids: Sequence[int] = (), include_failed: bool = False
    ) -> list[dict[str, Any]]:
        """Instances whose files are no longer needed and were last touched before ``older_than``.

        Failed jobs keep their file in dead/ until an admin purges them (``include_failed``).
        """
        states = (InstanceState.DONE, InstanceState.TRANSFORMED, InstanceState.UNROUTED) + (
            (InstanceState.FAILED,) if include_failed else ()
        )
        open_deliveries = select(deliveries.c.instance_id).where(
            deliveries.c.state.in_(
                (
                    DeliveryState.PENDING,
                    DeliveryState.SENDING,
                    DeliveryState.FAILED,
                    DeliveryState.DEAD,
                )
            )
        )
        query = select(instances.c.id, instances.c.spool_path, instances.c.output_path).where(
            instances.c.state.in_(states),
            instances.c.updated_at < older_than,
            instances.c.id.not_in(open_deliveries),
            or_(instances.c.spool_path.is_not(None), instances.c.output_path.is_not(None)),
        )
        if only_ids:
            query = query.where(instances.c.id.in_(only_ids))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def forget_paths(self, job_ids: Sequence[int]) -> None:
        """Record that the files of these instances were removed."""
        if not job_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(instances)
                .where(instances.c.id.in_(job_ids))
                .values(spool_path=None, output_path=None)
            )

    def queue(self, include_done: bool = False, limit: int = 1000) -> list[dict[str, Any]]:
        """Instances with their deliveries, newest first; unfinished ones unless include_done."""
        query = select(instances).order_by(instances.c.id.desc()).limit(limit)
        if not include_done:
            query = query.where(
                instances.c.state.in_(
                    (
                        InstanceState.RECEIVED,
                        InstanceState.PROCESSING,
                        InstanceState.TRANSFORMED,
                        InstanceState.FAILED,
                    )
                )
            )
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
            ids = [r["id"] for r in rows]
            dels = (
                conn.execute(
                    select(deliveries)
                    .where(deliveries.c.instance_id.in_(ids))
                    .order_by(deliveries.c.id)
                )
                .mappings()
                .all()
            )
        by_instance: dict[int, list[dict[str, Any]]] = {}
        for d in dels:
            by_instance.setdefault(d["instance_id"], []).append(
                {
                    k: d[k]
                    for k in (
                        "id",
                        "destination",
                        "state",
                        "attempts",
                        "next_attempt_at",
                        "last_status",
                        "error",
                    )
                }
            )
        for r in rows:
            r["destinations"] = json.loads(r["destinations"])
            r["deliveries"] = by_instance.get(r["id"], [])
        return rows

    def counts(self) -> dict[str, int]:
        """Number of instances per state and deliveries per state (keys ``delivery_<state>``)."""
        with self.engine.connect() as conn:
            out = {
                s: int(n)
                for s, n in conn.execute(
                    select(instances.c.state, func.count()).group_by(instances.c.state)
                )
            }
            out.update(
                {
                    f"delivery_{s}": int(n)
                    for s, n in conn.execute(
                        select(deliveries.c.state, func.count()).group_by(deliveries.c.state)
                    )
                }
            )
        return out


__all__ = ["DeliveryJob", "Job", "Ledger", "Received"]
