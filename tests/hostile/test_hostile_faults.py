"""Hostile suite, faults: the destination down, the ledger locked.

The ``guard`` fixture (conftest.py) checks afterwards that the node is up and that every
instance it acknowledged reached the sink.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest
from dicom_factory import make_mg
from peers import wait_for
from raw_peer import CT, dataset_bytes, send_bytes

from mr2nst.node.dicom.status import StoreStatus

pytestmark = pytest.mark.e2e  # like tests/e2e: real peers, run by `make test`


def mg_bytes() -> tuple[bytes, str]:
    ds = make_mg(rows=32, cols=24)
    del ds.file_meta
    return dataset_bytes(ds), str(ds.SOPInstanceUID)


def ct_bytes() -> tuple[bytes, str]:
    ds = make_mg(rows=16, cols=16, Modality="CT", SOPClassUID=CT)
    del ds.file_meta
    return dataset_bytes(ds), str(ds.SOPInstanceUID)


def test_destination_down_then_back_delivers(hostile):
    """With the sink stopped, an MG and a CT are acknowledged; their forwards fail and are
    retried; once the sink is back on its port both are delivered (the guard waits)."""
    hostile.sink.stop()
    try:
        for data, uid, sop_class in (*mg_bytes(), None), (*ct_bytes(), CT):
            kw = {"sop_class": sop_class} if sop_class else {}
            assert send_bytes(hostile.port, data, sop_uid=uid, **kw) == StoreStatus.SUCCESS
            hostile.ack(uid)

        def failed_forwards() -> bool:
            return any(
                e.get("event") == "stage_forward"
                and e.get("sop_uid") in hostile.acked
                and e.get("outcome") != "sent"
                for e in hostile.serve.events()
            )

        wait_for(failed_forwards, 30, "a failed forward attempt while the sink is down")
        assert not hostile.acked & hostile.received().keys()
    finally:
        hostile.sink.start()


@pytest.mark.parametrize("hold_s", [2.0, 6.0])
def test_ledger_locked_while_storing(hostile, hold_s):
    """The SQLite ledger held under an exclusive lock while a store arrives: the answer is
    0x0000 (then delivered) or 0xA700 out of resources (then not delivered), never an
    abort, and the node keeps running."""
    data, uid = mg_bytes()
    db = sqlite3.connect(hostile.data_dir / "ledger.db", timeout=30, isolation_level=None)
    result: dict[str, int | str] = {}
    try:
        db.execute("BEGIN EXCLUSIVE")
        sender = threading.Thread(
            target=lambda: result.update(status=send_bytes(hostile.port, data, sop_uid=uid))
        )
        sender.start()
        sender.join(hold_s)
        assert sender.is_alive() or result.get("status") == StoreStatus.OUT_OF_RESOURCES
    finally:
        db.execute("COMMIT")
        db.close()
    sender.join(60)
    assert not sender.is_alive()
    status = result["status"]
    assert status in (StoreStatus.SUCCESS, StoreStatus.OUT_OF_RESOURCES)
    hostile.record(uid, int(status))
