"""The ledger's tables (SQLAlchemy Core; valid on SQLite and PostgreSQL) and migrations.

Times are stored as float seconds since the epoch (UTC): portable and sortable on both
databases. The schema version lives in ``schema_version``; ``MIGRATIONS`` is an ordered
list and each entry moves the schema up by one version.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    case,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)

from mr2nst.node.errors import LedgerError

metadata = MetaData()

UID = String(64)

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sop_class_uid", UID, nullable=False),
    Column("sop_instance_uid", UID, nullable=False),
    Column("study_uid", UID, nullable=False, default=""),
    Column("series_uid", UID, nullable=False, default=""),
    Column("transfer_syntax", UID, nullable=False, default=""),
    Column("calling_ae", String(16), nullable=False, default=""),
    Column("called_ae", String(16), nullable=False, default=""),
    Column("peer", String(64), nullable=False, default=""),
    Column("route", String(64)),
    Column("action", String(16), nullable=False),
    Column("method", String(16)),
    Column("destinations", Text, nullable=False, default="[]"),  # JSON list, the route decision
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(128)),
    Column("lease_until", Float),  # also the not-before time of a job waiting to retry
    Column("spool_path", Text),
    Column("output_path", Text),
    Column("out_series_uid", UID),
    Column("out_sop_uid", UID),
    Column("error", Text),
    Column("received_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # v2: lanes, priorities, fallbacks
    Column("lane", String(16), nullable=False, default="method"),  # method | forward | none
    Column("priority", Integer, nullable=False, default=0),  # higher first within a lane
    Column("fallback_destinations", Text, nullable=False, default="[]"),  # JSON; [] = hold
    Column("fallback_reason", Text),  # why the original was sent instead of an output
    Index("ix_instances_state", "state", "id"),
    Index("ix_instances_sop", "sop_instance_uid"),
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("instance_id", Integer, ForeignKey("instances.id"), nullable=False),
    Column("destination", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_owner", String(128)),
    Column("lease_until", Float),
    Column("last_status", Integer),
    Column("error", Text),
    Column("updated_at", Float, nullable=False),
    # v2: what is sent: the method's output ("derived") or the received file ("original")
    Column("payload", String(16), nullable=False, default="derived"),
    UniqueConstraint("instance_id", "destination", name="uq_delivery_instance_destination"),
    Index("ix_deliveries_due", "state", "next_attempt_at"),
)

# v2: every processing and delivery attempt, kept across `queue retry` (the history).
attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("instance_id", Integer, ForeignKey("instances.id"), nullable=False),
    Column("delivery_id", Integer, ForeignKey("deliveries.id")),  # None: a processing attempt
    Column("at", Float, nullable=False),
    Column("stage", String(16), nullable=False),  # transform | deliver | fallback | retry
    Column("destination", String(64)),
    Column("status", Integer),  # the peer's DICOM status, when there was one
    Column("outcome", String(32), nullable=False),
    Column("reason", Text),
    Column("seconds", Float),  # how long the attempt took
    Index("ix_attempts_instance", "instance_id", "id"),
    Index("ix_attempts_stage", "stage"),
)

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=False),
)


# The columns that v2 added; v1 creates the tables without them.
_V2_COLUMNS = {
    "instances": (
        ("lane", "VARCHAR(16) NOT NULL DEFAULT 'method'"),
        ("priority", "INTEGER NOT NULL DEFAULT 0"),
        ("fallback_destinations", "TEXT NOT NULL DEFAULT '[]'"),
        ("fallback_reason", "TEXT"),
    ),
    "deliveries": (("payload", "VARCHAR(16) NOT NULL DEFAULT 'derived'"),),
}


def _v1_initial(conn: Connection) -> None:
    """The instances and deliveries tables as version 1 had them (without v2's columns)."""
    v2 = {name for cols in _V2_COLUMNS.values() for name, _ in cols}
    v1 = MetaData()
    old_instances = Table(
        "instances", v1, *(c._copy() for c in instances.columns if c.name not in v2)
    )
    old_deliveries = Table(
        "deliveries",
        v1,
        *(
            Column("instance_id", Integer, ForeignKey("instances.id"), nullable=False)
            if c.name == "instance_id"
            else c._copy()
            for c in deliveries.columns
            if c.name not in v2
        ),
        UniqueConstraint("instance_id", "destination", name="uq_delivery_instance_destination"),
    )
    Index("ix_instances_state", old_instances.c.state, old_instances.c.id)
    Index("ix_instances_sop", old_instances.c.sop_instance_uid)
    Index("ix_deliveries_due", old_deliveries.c.state, old_deliveries.c.next_attempt_at)
    v1.create_all(conn)


def _v2_lanes_fallbacks_history(conn: Connection) -> None:
    """Lanes, priorities and fallbacks (columns), the payload of a delivery, attempt history."""
    for table, columns in _V2_COLUMNS.items():
        for name, ddl in columns:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))
    attempts.create(conn)
    conn.execute(
        update(instances)
        .where(instances.c.action != "normalize")
        .values(lane=case((instances.c.action == "forward", "forward"), else_="none"))
    )


# Append new migrations; never edit an applied one.
MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_v1_initial, _v2_lanes_fallbacks_history)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: Connection, now: float) -> int:
    """Bring the schema up to ``SCHEMA_VERSION``; return the version found before."""
    schema_version.create(conn, checkfirst=True)
    current = conn.execute(select(func.max(schema_version.c.version))).scalar() or 0
    if current == 0 and inspect(conn).has_table("instances"):
        raise LedgerError("ledger has tables but no schema version; refusing to touch it")
    if current > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger schema version {current} is newer than this mr2nst ({SCHEMA_VERSION}); "
            "upgrade mr2nst"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[version - 1](conn)
        conn.execute(insert(schema_version).values(version=version, applied_at=now))
    return int(current)
