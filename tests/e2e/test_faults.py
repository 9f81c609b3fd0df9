"""End-to-end fault injection under load: kill -9 the node while a stream flows.

A pynetdicom sender streams instances over one association into `mr2nst serve`; the node
is killed with SIGKILL at one stage (during receive, right after an acknowledgement,
during a transform, during forwarding), restarted on the same data directory, and the
sender then sends again what was not acknowledged (as a modality does). Every instance the
node acknowledged must reach the DCMTK sink exactly once, or several times as identical
copies. The kill lands wherever the stream happens to be; the invariant is asserted
whichever byte or step it interrupts.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path

import psutil
import pydicom
import pytest
from peers import DCMTK, Serve, free_port, wait_for, write_ct
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, DigitalMammographyXRayImageStorageForPresentation
from support import uih_bank_files

from mr2nst.bank.bank import Bank
from mr2nst.node.lab.phantom_io import write_phantom_set

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not DCMTK, reason="DCMTK not installed")]

GE_ROUTE = {
    "name": "ge-mammo",
    "match": {"Modality": "MG", "Manufacturer": "GE*"},
    "action": "normalize",
    "method": "passthrough",
    "destinations": ["cad"],
}
CT_ROUTE = {"name": "ct", "match": {"Modality": "CT"}, "action": "forward", "destinations": ["cad"]}
TINY_ENGINE = {"features": "seeded-random", "patch_size": 32, "grids": [1, 2], "iterations": 6}


class UniqueSink:
    """DCMTK storescp writing every received instance to its own file (duplicates kept)."""

    def __init__(self, workdir: Path) -> None:
        import subprocess

        self.dir = workdir / "sink"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["storescp", "-aet", "CAD", "-od", str(self.dir), "+uf", "+xa", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Stream(threading.Thread):
    """Sends ``files`` over one association; records the SOP Instance UIDs acknowledged.

    ``on_ack(n)`` runs after the n-th acknowledgement (a test kills the node there).
    """

    def __init__(self, port: int, files: list[Path], on_ack=None) -> None:
        super().__init__(daemon=True)
        self.port, self.files, self.on_ack = port, files, on_ack
        self.acked: list[str] = []

    def run(self) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DigitalMammographyXRayImageStorageForPresentation)
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="MR2NST")
        if not assoc.is_established:
            return
        for path in self.files:
            try:
                rsp = assoc.send_c_store(path)
            except Exception:  # noqa: BLE001 - the node was killed under us
                break
            if not assoc.is_established or "Status" not in rsp:
                break
            if int(rsp.Status) == 0 or int(rsp.Status) & 0xF000 == 0xB000:
                self.acked.append(sop_uid(path))
                if self.on_ack is not None:
                    self.on_ack(len(self.acked))
        if assoc.is_established:
            assoc.release()


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def delivered(sink: UniqueSink) -> dict[str, list[pydicom.Dataset]]:
    """The sink's instances by the SOP Instance UID of the instance they came from."""
    by_source: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in sink.files():
        ds = pydicom.dcmread(path)
        if "SourceImageSequence" in ds:  # a derived instance names its source
            by_source[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)].append(ds)
        else:
            by_source[str(ds.SOPInstanceUID)].append(ds)
    return by_source


def kill9_and_reap(node: Serve) -> None:
    """SIGKILL the node; wait until its worker processes are gone as well."""
    assert node.proc is not None
    children = psutil.Process(node.proc.pid).children(recursive=True)
    node.kill9()
    psutil.wait_procs(children, timeout=15)


def assert_exactly_once_or_identical(sink: UniqueSink, sent: list[str], acked: set[str]) -> None:
    """Every acknowledged instance arrived; copies of one instance are identical."""
    got = wait_for(
        lambda: (d := delivered(sink)) and set(sent) <= set(d) and d,
        120,
        "every instance at the sink",
    )
    assert acked <= set(got)
    for uid, copies in got.items():
        first = copies[0]
        for other in copies[1:]:
            assert other == first, f"{uid}: a duplicate differs from the first copy"


@pytest.fixture(scope="module")
def mammograms(tmp_path_factory) -> list[Path]:
    """10 small GE phantom mammograms."""
    root = tmp_path_factory.mktemp("stream")
    write_phantom_set(root, 10, size=(256, 208), seed=11, vendors=("GE",))
    return sorted((root / "ge").glob("*.dcm"))


def run_scenario(tmp_path, cleanup, files, routes, kill_when, mid_stream=True, **sections) -> None:
    """Stream ``files``; ``kill_when(node, sink, stream)`` returns once it is time to kill.

    With ``mid_stream`` the kill must cut the stream (some acknowledged, some not);
    otherwise it must land while work is still left (not everything delivered yet).
    """
    sink = UniqueSink(tmp_path)
    cleanup(sink)
    node = Serve(tmp_path, routes, {"cad": sink.port}, **sections).start()
    cleanup(node)
    node.wait_for_event("worker_started")
    stream = Stream(node.port, files)
    stream.start()
    kill_when(node, sink, stream)
    kill9_and_reap(node)
    stream.join(30)
    acked = set(stream.acked)
    if mid_stream:
        assert 0 < len(acked) < len(files), f"the kill should cut the stream ({len(acked)} acked)"
    else:
        assert len(delivered(sink)) < len(files), "the kill should land with work left"

    node.start()
    rest = [f for f in files if sop_uid(f) not in acked]
    again = Stream(node.port, rest)
    again.start()
    again.join(120)
    assert len(again.acked) == len(rest)
    assert_exactly_once_or_identical(sink, [sop_uid(f) for f in files], acked)
    assert node.stop() == 0


def test_kill_during_receive(tmp_path, cleanup):
    """Killed while 8 MB CTs stream in: the acknowledged ones arrive, nothing twice differently."""
    files = [write_ct(tmp_path / "ct" / f"{i}.dcm", rows=2048, cols=2048) for i in range(8)]

    def when(node, sink, stream):
        node.wait_for_event("stage_receive", count=3)

    run_scenario(tmp_path, cleanup, files, [CT_ROUTE], when)


def test_kill_right_after_an_acknowledgement(tmp_path, cleanup, mammograms):
    """Killed the moment the 3rd mammogram is acknowledged: it is still delivered."""
    fired = threading.Event()

    def when(node, sink, stream):
        stream.on_ack = lambda n: n == 3 and fired.set()
        assert fired.wait(60)

    run_scenario(tmp_path, cleanup, mammograms, [GE_ROUTE], when)


def test_kill_during_a_transform(tmp_path, cleanup, mammograms):
    """Killed while the mr2nst engine works on a mammogram: every source is delivered once."""
    bank = Bank(tmp_path / "bank")
    bank.add([uih_bank_files(tmp_path / "uih")])

    def when(node, sink, stream):
        node.wait_for_event("stage_transform", count=1, timeout=120)
        node.wait_for_event("transfer_progress", count=3, timeout=120)

    run_scenario(
        tmp_path,
        cleanup,
        mammograms[:6],
        [{**GE_ROUTE, "method": "mr2nst"}],
        when,
        bank={"path": str(bank.layout.root), "allow_fewer": True},
        mid_stream=False,
        engine=TINY_ENGINE,
        workers={"lease_s": 3},
    )


def test_kill_during_forwarding(tmp_path, cleanup, mammograms):
    """Killed while outputs are being sent to the sink: each arrives once or identically twice."""

    def when(node, sink, stream):
        wait_for(lambda: len(sink.files()) >= 2, 60, "forwarding under way")

    run_scenario(tmp_path, cleanup, mammograms, [GE_ROUTE], when, mid_stream=False)
