"""Helpers shared by test packages (on sys.path through pytest's `pythonpath`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from mr2nst.core.lab.phantom import PhantomSpec, make_case
from mr2nst.node.dicom.iod import dciodvfy_available
from mr2nst.node.lab.phantom_io import phantom_dataset

SIZE = (256, 208)

# Tests that validate IODs need dicom3tools (`.ci/run` installs it); elsewhere they skip.
needs_dciodvfy = pytest.mark.skipif(
    not dciodvfy_available(), reason="dciodvfy (dicom3tools) is not installed"
)


def postgres_url() -> str | None:
    """A PostgreSQL server from the libpq environment (e.g. under `pg_virtualenv`), if any."""
    if "PGHOST" not in os.environ:
        return None
    env = os.environ
    return (
        f"postgresql://{env.get('PGUSER', 'postgres')}:{env.get('PGPASSWORD', '')}@{env['PGHOST']}:"
        f"{env.get('PGPORT', '5432')}/{env.get('PGDATABASE', 'postgres')}"
    )


def fresh_postgres() -> str:
    """The server's URL, with an empty public schema."""
    url = postgres_url()
    assert url is not None
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return url


def write_phantom(
    folder: Path,
    name: str,
    *,
    view: str = "CC",
    laterality: str = "L",
    seed: int = 0,
    vendor: str = "UIH",
    bits: int | None = None,
    photometric: str | None = None,
    size: tuple[int, int] = SIZE,
    **overrides: object,
) -> Path:
    """One small phantom mammogram file; ``overrides`` set attributes (None deletes)."""
    case = make_case(
        PhantomSpec(height=size[0], width=size[1], view=view, laterality=laterality, seed=seed)
    )
    ds = phantom_dataset(
        case,
        vendor,
        bits_stored=bits,
        photometric=photometric,
        patient_index=seed,
        uid_seed=f"test-{vendor}-{name}",
    )
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def uih_bank_files(folder: Path, per_view_side: int = 1) -> Path:
    """UIH references for every view and side (CC/MLO x L/R), ``per_view_side`` of each."""
    i = 0
    for view in ("CC", "MLO"):
        for laterality in ("L", "R"):
            for _ in range(per_view_side):
                write_phantom(folder, f"uih{i}", view=view, laterality=laterality, seed=100 + i)
                i += 1
    return folder
