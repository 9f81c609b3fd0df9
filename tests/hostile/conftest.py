"""The hostile suite's node: one real `mr2nst serve` and a DCMTK sink for the whole directory.

Every case runs under ``guard`` (autouse): the node's process tree is sampled for RSS while
the case runs, and afterwards the node must still be alive, answer a fresh C-ECHO, deliver
every instance the case got acknowledged, and never deliver one the case got refused.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pydicom
import pytest

HERE = Path(__file__).resolve().parent
for sub in ("e2e", "node"):  # peers.py (real peers) and dicom_factory.py (make_mg)
    path = str(HERE.parent / sub)
    if path not in sys.path:
        sys.path.append(path)

from dicom_factory import make_mg  # noqa: E402
from peers import DCMTK, Serve, StoreSCP, echo, storescu, wait_for  # noqa: E402
from raw_peer import PER_PEER, RSS_HEADROOM, TIMEOUT_S, Sampler  # noqa: E402

CALLERS = ("MODALITY", "PACS", "E2E")  # node.allowed_callers (E2E: peers.echo's default)


@dataclass
class Hostile:
    """The running node and sink, and what the current case got acknowledged or refused."""

    serve: Serve
    sink: StoreSCP
    workdir: Path
    baseline_rss: int = 0
    acked: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    seen: dict[Path, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.serve.port

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def ack(self, uid: str) -> None:
        """The case got a success or warning status for ``uid``: it must reach the sink."""
        self.acked.add(uid)

    def refuse(self, uid: str) -> None:
        """The case got ``uid`` refused (failure status or abort): it must not reach the sink."""
        self.refused.add(uid)

    def record(self, uid: str, status: int | None) -> None:
        """Record ``uid`` as acknowledged or refused, by the status the node answered."""
        if status is not None and (status == 0 or 0xB000 <= status <= 0xBFFF):
            self.ack(uid)
        else:
            self.refuse(uid)

    def received(self) -> dict[str, list[Path]]:
        """SOP Instance UID -> the sink's files holding it."""
        out: dict[str, list[Path]] = {}
        for path in self.sink.files():
            uid = self.seen.get(path)
            if uid is None:
                try:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                except Exception:  # noqa: BLE001 - a file storescp is still writing
                    continue
                uid = self.seen[path] = str(ds.SOPInstanceUID)
            out.setdefault(uid, []).append(path)
        return out

    def rss(self) -> int:
        """RSS of the node's process tree (serve and its children), in bytes."""
        assert self.serve.proc is not None
        try:
            main = psutil.Process(self.serve.proc.pid)
            procs = [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total


def routes() -> list[dict]:
    return [
        {
            "name": "mg",
            "match": {"Modality": "MG"},
            "action": "normalize",
            "method": "passthrough",
            "destinations": ["cad"],
            "forward_original": ["pacs"],
        },
        {"name": "others", "match": {}, "action": "forward", "destinations": ["pacs"]},
    ]


@pytest.fixture(scope="package")
def hostile(tmp_path_factory) -> Iterator[Hostile]:
    """One node for the directory: MG normalized (passthrough) plus its original forwarded,
    everything else forwarded; both destinations are the same DCMTK storescp."""
    if not DCMTK:
        pytest.skip("DCMTK (storescu/storescp/echoscu) not installed")
    workdir = tmp_path_factory.mktemp("hostile")
    sink = StoreSCP(workdir, "SINK").start()
    serve = Serve(
        workdir,
        routes(),
        {"cad": sink.port, "pacs": sink.port},
        node={
            "allowed_callers": list(CALLERS),
            "network_timeout_s": TIMEOUT_S,
            "max_associations_per_peer": PER_PEER,
            "max_associations": 16,
        },
    )
    try:
        serve.start()
        node = Hostile(serve, sink, workdir)
        # Warm up: one MG through the whole path (the worker imports its libraries and
        # normalizes it), so that the baseline is the node at work, not the node idle.
        warm = make_mg(rows=32, cols=24)
        warm.save_as(workdir / "warm.dcm", enforce_file_format=True)
        assert storescu(serve.port, [workdir / "warm.dcm"]).returncode == 0
        wait_for(lambda: len(sink.files()) >= 2, 120, "the warm-up original and derived")
        node.baseline_rss = node.rss()
        yield node
    finally:
        if serve.proc is not None and serve.proc.poll() is None:
            try:
                serve.stop(signal.SIGTERM, timeout=30)
            except Exception:  # noqa: BLE001 - best-effort teardown
                serve.stop(signal.SIGKILL)
        sink.stop()


@pytest.fixture(autouse=True)
def guard(hostile: Hostile, request: pytest.FixtureRequest) -> Iterator[Hostile]:
    """Per case: bounded memory, node alive and answering, acknowledged => delivered."""
    hostile.acked.clear()
    hostile.refused.clear()
    sampler = Sampler(hostile.rss)
    sampler.start()
    try:
        yield hostile
    finally:
        sampler.halt.set()
        sampler.join()
    assert hostile.serve.proc is not None and hostile.serve.proc.poll() is None, (
        "serve exited:\n" + hostile.serve.log_path.read_text()[-3000:]
    )
    assert echo(hostile.port, aet="MODALITY").returncode == 0, "node no longer answers C-ECHO"
    growth = sampler.peak - hostile.baseline_rss
    assert growth < RSS_HEADROOM, f"node RSS grew {growth / 2**20:.0f} MB over its baseline"
    if hostile.acked:
        wait_for(
            lambda: hostile.acked <= hostile.received().keys(),
            60,
            f"acknowledged instances at the sink: {sorted(hostile.acked)}",
        )
    arrived = hostile.received().keys() & hostile.refused
    assert not arrived, f"refused instances reached the sink: {sorted(arrived)}"
