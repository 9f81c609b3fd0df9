"""End-to-end: separate lanes (forwards never wait for a worker) and fallbacks to the original.

DCMTK storescu -> `mr2nst serve` -> DCMTK storescp.
"""

from __future__ import annotations

import signal

import psutil
import pydicom
import pytest
from peers import DCMTK, Serve, StoreSCP, storescu, wait_for, worker_processes, write_ct
from support import uih_bank_files, write_phantom

from mr2nst.node.ledger import Ledger

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


def test_forward_is_delivered_while_the_worker_is_stopped(tmp_path, phantoms, cleanup):
    """With the only worker stopped (SIGSTOP), a CT on a forward route still goes through."""
    cad, pacs = StoreSCP(tmp_path, "CAD").start(), StoreSCP(tmp_path, "PACS").start()
    cleanup(cad), cleanup(pacs)
    routes = [
        GE_ROUTE,
        {"name": "others", "match": {}, "action": "forward", "destinations": ["pacs"]},
    ]
    node = Serve(tmp_path, routes, {"cad": cad.port, "pacs": pacs.port}).start()
    cleanup(node)
    node.wait_for_event("worker_started")
    [worker] = wait_for(lambda: worker_processes(node), 30, "the worker process")
    worker.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: worker.status() == psutil.STATUS_STOPPED, 10, "the worker to stop")
        assert storescu(node.port, phantoms["ge"][:1]).returncode == 0  # waits for a worker
        ct = write_ct(tmp_path / "ct" / "ct.dcm")
        assert storescu(node.port, [ct]).returncode == 0
        [got] = wait_for(lambda: pacs.files(), 15, "the CT at the PACS, the worker stopped")
        out, src = read(got), read(ct)
        assert out.SOPInstanceUID == src.SOPInstanceUID and out.PixelData == src.PixelData
        assert cad.files() == [] and worker.status() == psutil.STATUS_STOPPED
    finally:
        worker.send_signal(signal.SIGCONT)
    wait_for(lambda: len(cad.files()) == 1, 60, "the MG once the worker runs again")
    assert node.stop() == 0
    transforms = [e for e in node.events() if e.get("event") == "stage_transform"]
    assert [e["sop_uid"] for e in transforms] == [str(read(phantoms["ge"][0]).SOPInstanceUID)]


def test_light_method_is_processed_while_the_engine_worker_is_stopped(tmp_path, phantoms, cleanup):
    """With the worker of every lane stopped, a light worker still runs a passthrough job."""
    cad = StoreSCP(tmp_path, "CAD").start()
    cleanup(cad)
    node = Serve(tmp_path, [GE_ROUTE], {"cad": cad.port}, workers={"light": 1}).start()
    cleanup(node)
    started = node.wait_for_event("worker_started", count=2)
    [full] = [e for e in started if e["lanes"] == ["method", "light"]]
    engine = psutil.Process(int(full["worker"].split(":")[1]))
    engine.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: engine.status() == psutil.STATUS_STOPPED, 10, "the worker to stop")
        assert storescu(node.port, phantoms["ge"][:1]).returncode == 0
        [got] = wait_for(lambda: cad.files(), 30, "the passthrough output, the engine stopped")
        assert read(got).ImageType[0] == "DERIVED" and engine.status() == psutil.STATUS_STOPPED
    finally:
        engine.send_signal(signal.SIGCONT)
    assert node.stop() == 0


def test_ml_view_reaches_the_destination_as_the_original(tmp_path, cleanup):
    """A GE MG with ViewPosition ML cannot be normalized (no ML references): the original
    goes to the route's destinations unchanged, and the ledger and log say why."""
    from mr2nst.bank.bank import Bank

    bank = Bank(tmp_path / "bank")
    assert len(bank.add([uih_bank_files(tmp_path / "uih")]).added) == 4
    src_path = write_phantom(tmp_path / "ge", "ml", vendor="GE", view="MLO", ViewPosition="ML")
    cad = StoreSCP(tmp_path, "CAD").start()
    cleanup(cad)
    node = Serve(
        tmp_path,
        [{**GE_ROUTE, "method": "ehm"}],
        {"cad": cad.port},
        bank={"path": str(bank.layout.root), "allow_fewer": True},
        methods={"references": 2},
    ).start()
    cleanup(node)
    assert storescu(node.port, [src_path]).returncode == 0
    [got] = wait_for(lambda: cad.files(), 60, "the original at the CAD")
    out, src = read(got), read(src_path)
    assert out.SOPInstanceUID == src.SOPInstanceUID
    assert out.SeriesInstanceUID == src.SeriesInstanceUID
    assert out.PixelData == src.PixelData and "DerivationDescription" not in out
    [event] = node.wait_for_event("stage_transform")
    assert event["outcome"] == "fallback"
    assert event["reason"].startswith("method.refused: NotEnoughReferences")
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'data' / 'ledger.db'}")
    try:
        row = wait_for(
            lambda: next(
                (r for r in ledger.queue(include_done=True) if r["state"] == "done"), None
            ),
            30,
            "the instance done",
        )
        assert row["fallback_reason"] == event["reason"]
        assert [h["stage"] for h in ledger.history(row["id"])] == [
            "transform",
            "fallback",
            "deliver",
        ]
    finally:
        ledger.close()
    assert node.stop() == 0
