"""Fixtures for the end-to-end tests (helpers live in peers.py)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from peers import Serve, StoreSCP

from mr2nst.node.lab.phantom_io import write_phantom_set


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> dict[str, list[Path]]:
    """Small phantom GE and UIH images, plus a JPEG 2000 lossless GE copy."""
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_set(root / "plain", 2, size=(256, 208), seed=3)
    write_phantom_set(root / "j2k", 1, size=(256, 208), seed=4, vendors=("GE",), j2k=True)
    return {
        "ge": sorted((root / "plain" / "ge").glob("*.dcm")),
        "uih": sorted((root / "plain" / "uih").glob("*.dcm")),
        "ge_j2k": sorted((root / "j2k" / "ge").glob("*.dcm")),
    }


@pytest.fixture
def cleanup():
    """Stops every process registered with it at the end of the test."""
    things: list = []
    yield things.append
    for thing in reversed(things):
        try:
            if isinstance(thing, Serve) and thing.proc and thing.proc.poll() is None:
                thing.stop(signal.SIGKILL)
            elif isinstance(thing, StoreSCP):
                thing.stop()
            elif hasattr(thing, "shutdown"):
                thing.shutdown()
            elif hasattr(thing, "stop"):  # e.g. the TLS storescp of test_tls_e2e
                thing.stop()
        except Exception:  # noqa: BLE001 - best-effort teardown
            pass
