"""Ledger rows written straight into the schema, for tests of what is read from it
(metrics, `mr2nst status`, `queue list`) independent of who writes them in the node."""

from __future__ import annotations

import json

from sqlalchemy import insert

from mr2nst.node.ledger import Ledger
from mr2nst.node.ledger.schema import attempts, deliveries, instances

_counter = iter(range(1, 1_000_000))


def instance(
    ledger: Ledger,
    *,
    state: str = "received",
    lane: str = "method",
    method: str | None = "ehm",
    route: str = "mg",
    destinations: tuple[str, ...] = ("cad",),
    received_at: float = 1000.0,
    study: str = "1.2.3",
    fallback_reason: str | None = None,
    error: str | None = None,
) -> int:
    """Insert one instance; returns its id."""
    n = next(_counter)
    with ledger.engine.begin() as conn:
        key = conn.execute(
            insert(instances).values(
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                sop_instance_uid=f"1.2.3.{n}",
                study_uid=study,
                series_uid="1.2.3.4",
                transfer_syntax="1.2.840.10008.1.2.1",
                calling_ae="MOD",
                called_ae="MR2NST",
                peer="127.0.0.1",
                route=route,
                action="forward" if lane == "forward" else "normalize",
                method=method,
                destinations=json.dumps(list(destinations)),
                state=state,
                attempts=0,
                spool_path=None,
                error=error,
                received_at=received_at,
                updated_at=received_at,
                lane=lane,
                fallback_reason=fallback_reason,
            )
        ).inserted_primary_key
    assert key is not None
    return int(key[0])


def delivery(
    ledger: Ledger,
    instance_id: int,
    destination: str = "cad",
    *,
    state: str = "pending",
    error: str | None = None,
    last_status: int | None = None,
    updated_at: float = 1000.0,
) -> int:
    """Insert one delivery of an instance; returns its id."""
    with ledger.engine.begin() as conn:
        key = conn.execute(
            insert(deliveries).values(
                instance_id=instance_id,
                destination=destination,
                state=state,
                attempts=1 if error else 0,
                next_attempt_at=updated_at,
                last_status=last_status,
                error=error,
                updated_at=updated_at,
            )
        ).inserted_primary_key
    assert key is not None
    return int(key[0])


def attempt(
    ledger: Ledger,
    instance_id: int,
    *,
    stage: str = "transform",
    outcome: str = "transformed",
    at: float = 1000.0,
    seconds: float | None = None,
    destination: str | None = None,
    delivery_id: int | None = None,
    status: int | None = None,
    reason: str | None = None,
) -> None:
    """Insert one row of an instance's attempt history."""
    with ledger.engine.begin() as conn:
        conn.execute(
            insert(attempts).values(
                instance_id=instance_id,
                delivery_id=delivery_id,
                at=at,
                stage=stage,
                destination=destination,
                status=status,
                outcome=outcome,
                reason=reason,
                seconds=seconds,
            )
        )
