"""End-to-end: DCMTK storescu -> `mr2nst serve` -> DCMTK storescp (or a pynetdicom AE)."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request

import numpy as np
import psutil
import pydicom
import pytest
from peers import DCMTK, MR2NST, Serve, StoreSCP, echo, free_port, storescu, wait_for
from pynetdicom import AE, AllStoragePresentationContexts, evt
from support import fresh_postgres, needs_dciodvfy, postgres_url

from mr2nst.node.dicom.iod import iod_errors
from mr2nst.node.dicom.pixels import decode_stored

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not DCMTK, reason="DCMTK not installed")]

GE_ROUTE = {
    "name": "ge-mammo",
    "match": {"Modality": "MG", "Manufacturer": "GE*"},
    "action": "normalize",
    "method": "passthrough",
    "destinations": ["cad"],
}


def read(path):
    return pydicom.dcmread(path)


@needs_dciodvfy
def test_normalize_route_delivers_valid_derived_series(tmp_path, phantoms, cleanup):
    """GE images come out at the CAD as a new, valid derived series with the same pixels."""
    cad = StoreSCP(tmp_path, "CAD").start()
    cleanup(cad)
    metrics_port = free_port()
    node = Serve(tmp_path, [GE_ROUTE], {"cad": cad.port}, metrics={"port": metrics_port}).start()
    cleanup(node)
    assert storescu(node.port, phantoms["ge"]).returncode == 0
    files = wait_for(lambda: len(cad.files()) == 2 and cad.files(), 60, "2 derived instances")
    scraped = (
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    assert 'mr2nst_cstore_total{status="0x0000"} 2.0' in scraped
    sources = {str(read(p).SOPInstanceUID): read(p) for p in phantoms["ge"]}
    for path in files:
        out = read(path)
        src = sources[out.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert (
            out.SeriesInstanceUID != src.SeriesInstanceUID
            and out.SOPInstanceUID != src.SOPInstanceUID
        )
        assert out.StudyInstanceUID == src.StudyInstanceUID and out.ImageType[0] == "DERIVED"
        assert out.SeriesNumber == src.SeriesNumber + 1000
        assert out.SourceImageSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert np.array_equal(decode_stored(out), decode_stored(src))
        assert iod_errors(path) == []
    assert node.stop() == 0
    stages = [e for e in node.events() if e.get("event") == "stage_forward"]
    assert len(stages) == 2 and all(e["outcome"] == "sent" and "duration_ms" in e for e in stages)


def test_drop_route_and_forward_original(tmp_path, phantoms, cleanup):
    """A drop route delivers nothing; a forward route delivers the original unchanged."""
    cad = StoreSCP(tmp_path, "CAD").start()
    cleanup(cad)
    routes = [
        {
            "name": "drop-uih-cc",
            "match": {"Manufacturer": "UIH*", "ViewPosition": "CC"},
            "action": "drop",
        },
        {
            "name": "fwd-uih",
            "match": {"Manufacturer": "UIH*"},
            "action": "forward",
            "destinations": ["cad"],
        },
    ]
    node = Serve(tmp_path, routes, {"cad": cad.port}).start()
    cleanup(node)
    views = {str(read(p).ViewPosition) for p in phantoms["uih"]}
    assert storescu(node.port, phantoms["uih"]).returncode == 0
    expected = 1 if "CC" in views else 2
    files = wait_for(
        lambda: len(cad.files()) >= expected and cad.files(), 60, "forwarded originals"
    )
    originals = {str(read(p).SOPInstanceUID): read(p) for p in phantoms["uih"]}
    for path in files:
        out = read(path)
        src = originals[str(out.SOPInstanceUID)]
        assert out.SeriesInstanceUID == src.SeriesInstanceUID and out.PixelData == src.PixelData
    # The peer has the file a moment before the ledger records the delivery.
    counts = wait_for(
        lambda: (c := node.queue()["counts"]).get("done") == expected and c, 30, "done"
    )
    assert counts.get("dropped", 0) == 2 - expected


def test_two_destinations(tmp_path, phantoms, cleanup):
    """A route with two destinations delivers to both."""
    a, b = StoreSCP(tmp_path, "CAD").start(), StoreSCP(tmp_path, "VIEWER").start()
    cleanup(a), cleanup(b)
    node = Serve(
        tmp_path,
        [{**GE_ROUTE, "destinations": ["cad", "viewer"]}],
        {"cad": a.port, "viewer": b.port},
    )
    cleanup(node.start())
    assert storescu(node.port, phantoms["ge"][:1]).returncode == 0
    wait_for(lambda: len(a.files()) == 1 and len(b.files()) == 1, 60, "both destinations")
    assert read(a.files()[0]).SOPInstanceUID == read(b.files()[0]).SOPInstanceUID


def test_destination_down_then_up_is_delivered_after_retries(tmp_path, phantoms, cleanup):
    """While the CAD is down deliveries retry with backoff; once it is up they arrive."""
    cad = StoreSCP(tmp_path, "CAD", port=free_port())
    node = Serve(tmp_path, [GE_ROUTE], {"cad": cad.port}).start()
    cleanup(node)
    assert storescu(node.port, phantoms["ge"][:1]).returncode == 0

    def attempts():
        items = node.queue()["items"]
        return items and items[0]["deliveries"] and items[0]["deliveries"][0]["attempts"] >= 2

    wait_for(attempts, 60, "two failed attempts")
    assert node.queue()["items"][0]["deliveries"][0]["state"] in ("failed", "sending")
    cleanup(cad.start())
    wait_for(lambda: len(cad.files()) == 1, 60, "delivery after the CAD came back")
    wait_for(lambda: node.queue()["counts"].get("done") == 1, 30, "done")


class RejectingSCP:
    """A pynetdicom AE that refuses with 0xA900 until told to accept."""

    def __init__(self) -> None:
        self.status = 0xA900
        self.received = 0
        ae = AE(ae_title="CAD")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.handle)]
        )

    def handle(self, event) -> int:
        if self.status == 0:
            self.received += 1
        return self.status

    def shutdown(self) -> None:
        self.server.shutdown()


def test_permanent_rejection_goes_dead_then_queue_retry(tmp_path, phantoms, cleanup):
    """A 0xA900 rejection makes the delivery dead at once; `queue retry` delivers it later."""
    peer = RejectingSCP()
    cleanup(peer)
    node = Serve(tmp_path, [GE_ROUTE], {"cad": peer.port}).start()
    cleanup(node)
    assert storescu(node.port, phantoms["ge"][:1]).returncode == 0
    wait_for(lambda: node.queue()["counts"].get("delivery_dead") == 1, 60, "dead delivery")
    [item] = node.queue()["items"]
    assert item["deliveries"][0]["attempts"] == 1 and item["deliveries"][0]["last_status"] == 0xA900
    peer.status = 0
    out = node.cli("queue", "retry", "--all")
    assert out.returncode == 0 and "revived 1" in out.stdout
    wait_for(lambda: peer.received == 1, 60, "delivery after retry")


def test_kill_9_between_receive_and_forward_loses_nothing(tmp_path, phantoms, cleanup):
    """Acknowledged instances survive a kill -9 of the node and are delivered after restart."""
    cad = StoreSCP(tmp_path, "CAD", port=free_port())
    node = Serve(tmp_path, [GE_ROUTE], {"cad": cad.port}).start()
    cleanup(node)
    children = psutil.Process(node.proc.pid).children(recursive=True)
    assert storescu(node.port, phantoms["ge"]).returncode == 0
    node.kill9()
    psutil.wait_procs(children, timeout=15)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), (
        "orphan worker"
    )
    cleanup(cad.start())
    cleanup(node.start())
    wait_for(lambda: len(cad.files()) == 2, 90, "both instances after restart")
    wait_for(lambda: node.queue()["counts"].get("done") == 2, 30, "both done")


def test_caller_not_on_allowlist_is_rejected(tmp_path, phantoms, cleanup):
    """A calling AE not on allowed_callers cannot associate; an allowed one can."""
    node = Serve(
        tmp_path, [GE_ROUTE], {"cad": free_port()}, node={"allowed_callers": ["MODALITY", "E2E"]}
    ).start()
    cleanup(node)
    bad = echo(node.port, aet="INTRUDER")
    assert bad.returncode != 0 and "Rejected" in (bad.stdout + bad.stderr)
    assert storescu(node.port, phantoms["ge"][:1], aet="INTRUDER").returncode != 0
    assert storescu(node.port, phantoms["ge"][:1], aet="MODALITY").returncode == 0
    counts = node.queue()["counts"]  # one snapshot: the instance moves on while we look
    assert sum(n for state, n in counts.items() if not state.startswith("delivery_")) == 1


def test_jpeg2000_input_is_decoded_and_normalized(tmp_path, phantoms, cleanup):
    """A JPEG 2000 lossless GE image is accepted, decoded and delivered uncompressed."""
    cad = StoreSCP(tmp_path, "CAD").start()
    cleanup(cad)
    node = Serve(tmp_path, [GE_ROUTE], {"cad": cad.port}).start()
    cleanup(node)
    src = read(phantoms["ge_j2k"][0])
    assert src.file_meta.TransferSyntaxUID.is_compressed
    done = storescu(node.port, phantoms["ge_j2k"], extra=["-xv"])  # propose JPEG 2000 lossless
    assert done.returncode == 0, done.stderr
    [path] = wait_for(lambda: cad.files(), 60, "derived J2K instance")
    out = read(path)
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert np.array_equal(decode_stored(out), decode_stored(src))


def test_sigterm_stops_gracefully(tmp_path, cleanup):
    """SIGTERM stops accepting and exits 0; the port is closed afterwards."""
    node = Serve(tmp_path, [GE_ROUTE], {"cad": free_port()}).start()
    cleanup(node)
    assert node.stop(signal.SIGTERM) == 0
    assert echo(node.port).returncode != 0
    assert any(e.get("event") == "node_stopped" for e in node.events())


def test_mr2nst_send_and_echo_cli(tmp_path, phantoms, cleanup):
    """`mr2nst echo` and `mr2nst send` talk to a real storescp."""
    cad = StoreSCP(tmp_path, "CAD").start()
    cleanup(cad)
    assert (
        subprocess.run([MR2NST, "echo", "127.0.0.1", str(cad.port), "--aec", "CAD"]).returncode == 0
    )
    out = subprocess.run(
        [
            MR2NST,
            "send",
            "127.0.0.1",
            str(cad.port),
            "--aec",
            "CAD",
            "--json",
            str(phantoms["ge"][0].parent),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and '"sent": 2' in out.stdout
    assert len(cad.files()) == 2


@pytest.mark.skipif(postgres_url() is None, reason="no PostgreSQL server (run under pg_virtualenv)")
def test_node_on_postgresql_ledger(tmp_path, phantoms, cleanup):
    """The node runs end to end with its ledger on PostgreSQL."""
    url = fresh_postgres()
    cad = StoreSCP(tmp_path, "CAD").start()
    cleanup(cad)
    node = Serve(tmp_path, [GE_ROUTE], {"cad": cad.port}, ledger={"url": url}).start()
    cleanup(node)
    assert storescu(node.port, phantoms["ge"]).returncode == 0
    wait_for(lambda: len(cad.files()) == 2, 60, "2 derived instances via a PostgreSQL ledger")
    wait_for(lambda: node.queue()["counts"].get("done") == 2, 30, "both done")


def test_sigterm_to_the_process_group_stops_cleanly(tmp_path, cleanup):
    """A SIGTERM to the whole process group (Ctrl-C, plain systemd) still stops the node with 0."""
    node = Serve(tmp_path, [GE_ROUTE], {"cad": free_port()}).start()
    cleanup(node)
    node.wait_for_event("worker_started")  # the worker now ignores SIGTERM (the node stops it)
    os.killpg(node.proc.pid, signal.SIGTERM)
    assert node.proc.wait(60) == 0
    node.log.close()


@needs_dciodvfy
def test_ehm_route_delivers_uih_scaled_series(tmp_path, phantoms, cleanup):
    """An ehm route normalizes a GE image to the bank's 14-bit UIH scale, IOD-valid."""
    from support import uih_bank_files

    from mr2nst.bank.bank import Bank

    bank = Bank(tmp_path / "bank")
    assert len(bank.add([uih_bank_files(tmp_path / "uih")]).added) == 4
    cad = StoreSCP(tmp_path, "CAD").start()
    cleanup(cad)
    route = {**GE_ROUTE, "method": "ehm"}
    node = Serve(
        tmp_path,
        [route],
        {"cad": cad.port},
        bank={"path": str(bank.layout.root), "allow_fewer": True},
        methods={"references": 5},
    ).start()
    cleanup(node)
    assert storescu(node.port, phantoms["ge"]).returncode == 0
    files = wait_for(lambda: len(cad.files()) == 2 and cad.files(), 60, "2 ehm-derived instances")
    for path in files:
        out = read(path)
        assert out.BitsStored == 14 and "method=ehm" in out.DerivationDescription
        assert iod_errors(path) == []


@needs_dciodvfy
def test_mr2nst_route_end_to_end(tmp_path, phantoms, cleanup):
    """An mr2nst route (tiny settings, seeded-random features) delivers a valid derived series."""
    from support import uih_bank_files

    from mr2nst.bank.bank import Bank

    bank = Bank(tmp_path / "bank")
    bank.add([uih_bank_files(tmp_path / "uih")])
    cad = StoreSCP(tmp_path, "CAD").start()
    cleanup(cad)
    node = Serve(
        tmp_path,
        [{**GE_ROUTE, "method": "mr2nst"}],
        {"cad": cad.port},
        bank={"path": str(bank.layout.root), "allow_fewer": True},
        engine={
            "features": "seeded-random",
            "patch_size": 32,
            "grids": [1, 2],
            "iterations": 2,
        },
        workers={"lease_s": 30},
    ).start()
    cleanup(node)
    assert storescu(node.port, phantoms["ge"][:1]).returncode == 0
    [path] = wait_for(lambda: cad.files(), 120, "the mr2nst-derived instance")
    out = read(path)
    assert (
        "method=mr2nst" in out.DerivationDescription
        and "seeded-random" in out.DerivationDescription
    )
    assert out.BitsStored == 14 and iod_errors(path) == []
    assert any(e.get("event") == "transfer_progress" for e in node.events())
