"""What ``mr2nst queue`` and the cleanup job ask of the ledger: revive, give up, list, count.

:class:`LedgerAdmin` is a base of :class:`~mr2nst.node.ledger.store.Ledger`; its methods are
the ledger's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Engine, func, insert, or_, select, update

from mr2nst.node.ledger.records import Clock
from mr2nst.node.ledger.schema import attempts, deliveries, instances
from mr2nst.node.ledger.states import DeliveryState, InstanceState
from mr2nst.node.ledger.stats import history


class LedgerAdmin:
    """The ledger's administrative operations (see :class:`~mr2nst.node.ledger.store.Ledger`)."""

    engine: Engine
    clock: Clock

    def retry(self, ids: Sequence[int] = ()) -> int:
        """Revive dead deliveries and failed jobs (all, or the given job ids).

        Each revived delivery and job gets a ``retry`` row in its attempt history; the
        history before it is kept.

        Returns:
            How many deliveries and jobs were revived.
        """
        now = self.clock()
        with self.engine.begin() as conn:
            dq = select(deliveries.c.id, deliveries.c.instance_id, deliveries.c.destination).where(
                deliveries.c.state == DeliveryState.DEAD
            )
            jq = select(instances.c.id).where(
                instances.c.state == InstanceState.FAILED, instances.c.spool_path.is_not(None)
            )
            if ids:
                dq = dq.where(deliveries.c.instance_id.in_(ids))
                jq = jq.where(instances.c.id.in_(ids))
            dead = conn.execute(dq).all()
            failed = [int(r[0]) for r in conn.execute(jq)]
            if dead:
                conn.execute(
                    update(deliveries)
                    .where(
                        deliveries.c.id.in_([d.id for d in dead]),
                        deliveries.c.state == DeliveryState.DEAD,
                    )
                    .values(
                        state=DeliveryState.PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        error=None,
                        updated_at=now,
                    )
                )
            if failed:
                conn.execute(
                    update(instances)
                    .where(instances.c.id.in_(failed), instances.c.state == InstanceState.FAILED)
                    .values(
                        state=InstanceState.RECEIVED,
                        attempts=0,
                        lease_until=None,
                        error=None,
                        updated_at=now,
                    )
                )
            revived = [
                {"instance_id": d.instance_id, "delivery_id": d.id, "destination": d.destination}
                for d in dead
            ] + [{"instance_id": job, "delivery_id": None, "destination": None} for job in failed]
            if revived:
                conn.execute(
                    insert(attempts),
                    [
                        {
                            **r,
                            "at": now,
                            "stage": "retry",
                            "outcome": "revived",
                            "reason": "mr2nst queue retry",
                        }
                        for r in revived
                    ],
                )
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
        return len(revived)

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

    def queue(
        self,
        include_done: bool = False,
        limit: int = 1000,
        *,
        states: Sequence[str] = (),
        destination: str | None = None,
        study: str | None = None,
        since: float | None = None,
    ) -> list[dict[str, Any]]:
        """Instances with their deliveries and attempt history, newest first.

        Args:
            include_done: also settled instances (done, dropped, unrouted); implied by
                ``states``.
            limit: at most this many instances.
            states: only instances in one of these states, or with a delivery in one of
                them (instance and delivery state names alike).
            destination: only instances bound for this destination (route, fallback or
                delivery).
            study: only this StudyInstanceUID.
            since: only instances received at or after this time (seconds since the epoch).
        """
        query = select(instances).order_by(instances.c.id.desc()).limit(limit)
        if states:
            query = query.where(_in_states(states))
        elif not include_done:
            query = query.where(instances.c.state.in_(_UNSETTLED))
        if destination is not None:
            query = query.where(_bound_for(destination))
        if study is not None:
            query = query.where(instances.c.study_uid == study)
        if since is not None:
            query = query.where(instances.c.received_at >= since)
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
            histories = history(conn, ids)
        by_instance: dict[int, list[dict[str, Any]]] = {}
        for d in dels:
            by_instance.setdefault(d["instance_id"], []).append(
                {k: d[k] for k in _DELIVERY_KEYS if k in d}
            )
        for r in rows:
            r["destinations"] = json.loads(r["destinations"])
            if isinstance(r.get("fallback_destinations"), str):
                r["fallback_destinations"] = json.loads(r["fallback_destinations"])
            r["deliveries"] = by_instance.get(r["id"], [])
            r["history"] = histories.get(r["id"], [])
        return rows

    def expire_dead_leases(self, host: str, alive: Callable[[int], bool]) -> int:
        """End at once the leases held by processes of ``host`` that no longer exist.

        Lease owners read ``host:pid:role``. After a crash (kill -9, OOM), the restarted
        node takes back its predecessor's jobs and sends now, instead of after the lease
        (a minute for a delivery) runs out; leases of live processes, and of other hosts
        sharing a PostgreSQL ledger, are left alone.

        Args:
            host: this host's name, as the owners write it.
            alive: whether a process id exists on this host.

        Returns:
            How many jobs and deliveries were freed.
        """
        now = self.clock()
        prefix = f"{_escape_like(host)}:%"
        held = (
            (instances, instances.c.state == InstanceState.PROCESSING),
            (deliveries, deliveries.c.state == DeliveryState.SENDING),
        )
        freed = 0
        with self.engine.begin() as conn:
            for table, leased in held:
                owners = conn.execute(
                    select(table.c.lease_owner)
                    .where(leased, table.c.lease_owner.like(prefix, escape="\\"))
                    .distinct()
                ).scalars()
                dead = [o for o in owners if not _owner_alive(o, alive)]
                if dead:
                    freed += conn.execute(
                        update(table)
                        .where(leased, table.c.lease_owner.in_(dead))
                        .values(lease_until=now - 1.0)  # lapsed: claimable at once
                    ).rowcount
        return freed

    def counts(self) -> dict[str, int]:
        """Number of instances per state and deliveries per state (keys ``delivery_<state>``)."""
        with self.engine.connect() as conn:
            out: dict[str, int] = {
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


# Instances still being worked on (or given up), as ``queue list`` shows them by default.
_UNSETTLED = (
    InstanceState.RECEIVED,
    InstanceState.PROCESSING,
    InstanceState.TRANSFORMED,
    InstanceState.FAILED,
)
_DELIVERY_KEYS = (
    "id",
    "destination",
    "state",
    "attempts",
    "next_attempt_at",
    "last_status",
    "error",
    "payload",
)


def _owner_alive(owner: str, alive: Callable[[int], bool]) -> bool:
    """Whether the process of a ``host:pid:role`` lease owner is alive (unparsable: yes)."""
    parts = owner.split(":")
    if len(parts) < 3 or not parts[1].isdigit():
        return True
    return alive(int(parts[1]))


def _in_states(states: Sequence[str]) -> ColumnElement[bool]:
    """Instances in one of ``states``, or with a delivery in one of them."""
    delivery_states = [s for s in states if s in set(DeliveryState)]
    return or_(
        instances.c.state.in_([s for s in states if s in set(InstanceState)]),
        instances.c.id.in_(
            select(deliveries.c.instance_id).where(deliveries.c.state.in_(delivery_states))
        ),
    )


def _bound_for(destination: str) -> ColumnElement[bool]:
    """Instances whose route, fallback or deliveries name ``destination``."""
    # The route decision is a JSON list of names; match the name as JSON writes it.
    needle = "%" + _escape_like(json.dumps(destination)) + "%"
    return or_(
        instances.c.destinations.like(needle, escape="\\"),
        instances.c.fallback_destinations.like(needle, escape="\\"),
        instances.c.id.in_(
            select(deliveries.c.instance_id).where(deliveries.c.destination == destination)
        ),
    )


def _escape_like(text: str) -> str:
    """``text`` with LIKE's wildcards (and the escape character) escaped by a backslash."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
