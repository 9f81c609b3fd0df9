"""Helpers shared by test packages (on sys.path through pytest's `pythonpath`)."""

from __future__ import annotations

import os

from sqlalchemy import create_engine


def postgres_url() -> str | None:
    """A PostgreSQL server from the libpq environment (e.g. under `pg_virtualenv`), if any."""
    if "PGHOST" not in os.environ:
        return None
    env = os.environ
    return (f"postgresql://{env.get('PGUSER', 'postgres')}:{env.get('PGPASSWORD', '')}@{env['PGHOST']}:"
            f"{env.get('PGPORT', '5432')}/{env.get('PGDATABASE', 'postgres')}")


def fresh_postgres() -> str:
    """The server's URL, with an empty public schema."""
    url = postgres_url()
    assert url is not None
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return url
