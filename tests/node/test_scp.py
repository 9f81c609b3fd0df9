"""Tests of the C-STORE SCP with real pynetdicom associations on ephemeral ports."""

import json
from io import BytesIO
from types import SimpleNamespace

import pydicom
import pytest
from dicom_factory import make_mg
from pydicom.filebase import DicomBytesIO
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification
from structlog.testing import capture_logs

from mr2nst.node.config import parse_config
from mr2nst.node.dicom.status import StoreStatus
from mr2nst.node.ledger import Ledger
from mr2nst.node.service import scp
from mr2nst.node.service.routing import Router
from mr2nst.node.service.spool import Spool

ROUTES = {
    "routes": [
        {"name": "junk", "match": {"SeriesDescription": "JUNK*"}, "action": "drop"},
        {
            "name": "mg",
            "match": {"Modality": "MG"},
            "method": "passthrough",
            "destinations": ["cad"],
            "priority": 3,
            "forward_original": ["archive"],
            "fallback_destinations": ["pacs"],
        },
        {
            "name": "ct",
            "match": {"Modality": "CT"},
            "action": "forward",
            "destinations": ["pacs"],
            "priority": 7,
        },
    ],
    "destinations": {
        name: {"ae_title": name.upper(), "host": "127.0.0.1", "port": 1}
        for name in ("cad", "pacs", "archive")
    },
}


@pytest.fixture
def node(tmp_path):
    """Starts SCPs on ephemeral ports (node settings as keyword overrides); stops them after."""

    def start(**node_overrides):
        cfg = parse_config(
            {
                **ROUTES,
                "node": {
                    "host": "127.0.0.1",
                    "data_dir": str(tmp_path / "data"),
                    "min_free_disk_mb": 0,
                    **node_overrides,
                },
            },
            environ={},
        )
        spool = Spool(cfg.node.data_dir).create()
        ledger = Ledger.open(cfg.ledger_url)
        service = scp.StoreService(
            spool,
            ledger,
            Router(cfg.routes),
            cfg.node.min_free_disk_mb,
            scp.Allowlist.parse(cfg.node.allowed_callers),
        )
        server = scp.start_scp(cfg, service, port=0)
        started.append((server, ledger))
        return SimpleNamespace(
            port=server.server_address[1], ledger=ledger, spool=spool, service=service
        )

    started: list = []
    yield start
    for server, ledger in started:
        server.shutdown()
        ledger.close()


def store(port, ds, calling="MODALITY"):
    """C-STORE ``ds`` from ``calling``; returns the association and the status (or None)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MR2NST")
    if not assoc.is_established:
        return assoc, None
    rsp = assoc.send_c_store(ds)
    assoc.release()
    return assoc, int(rsp.Status)


def test_store_persists_then_acknowledges(node):
    """A stored instance is on disk, complete, with a ledger row, when Success returns."""
    n = node()
    ds = make_mg()
    _, status = store(n.port, ds)
    assert status == StoreStatus.SUCCESS
    [row] = n.ledger.queue()
    assert row["state"] == "received" and row["route"] == "mg" and row["destinations"] == ["cad"]
    saved = pydicom.dcmread(row["spool_path"])
    assert saved.SOPInstanceUID == ds.SOPInstanceUID and saved.PixelData == ds.PixelData
    assert saved.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert list(n.spool.tmp.iterdir()) == []


def test_forward_route_is_handed_to_the_forwarder_at_receive(node):
    """A forward is recorded ready to send, with its delivery, before Success returns."""
    n = node()
    ds = make_mg(sop_class=CTImageStorage, Modality="CT")
    _, status = store(n.port, ds)
    assert status == StoreStatus.SUCCESS
    [row] = n.ledger.queue()
    assert (row["state"], row["lane"], row["priority"]) == ("transformed", "forward", 7)
    [send] = n.ledger.claim_deliveries("f", 10, 60)
    assert (send.destination, send.payload, send.path) == ("pacs", "original", row["spool_path"])
    assert n.ledger.claim_job("w", 30) is None  # no worker ever takes it


def test_normalize_route_records_lane_priority_and_fallback(node):
    """A normalize instance waits for a worker; its forward_original deliveries exist at once."""
    n = node()
    _, status = store(n.port, make_mg())
    assert status == StoreStatus.SUCCESS
    [row] = n.ledger.queue()
    # passthrough is a light method: its jobs never wait behind mr2nst jobs
    assert (row["state"], row["lane"], row["priority"]) == ("received", "light", 3)
    assert as_list(row["fallback_destinations"]) == ["pacs"]
    [send] = n.ledger.claim_deliveries("f", 10, 60)
    assert (send.destination, send.payload) == ("archive", "original")


def test_hold_route_records_no_fallback(tmp_path):
    """A route with on_failure = hold records an empty fallback (the job is held)."""
    cfg = parse_config(
        {
            "node": {"data_dir": str(tmp_path / "d"), "min_free_disk_mb": 0},
            "routes": [{"name": "mg", "destinations": ["cad"], "on_failure": "hold"}],
            "destinations": ROUTES["destinations"],
        },
        environ={},
    )
    spool = Spool(cfg.node.data_dir).create()
    ledger = Ledger.open(cfg.ledger_url)
    service = scp.StoreService(spool, ledger, Router(cfg.routes), 0, scp.Allowlist.parse([]))
    ds = make_mg()
    event = fake_event(ds)
    event.encoded_dataset = lambda include_meta=True: dicom_file_bytes(ds)
    assert scp.handle_store(event, service) == StoreStatus.SUCCESS
    [row] = ledger.queue()
    ledger.close()
    assert as_list(row["fallback_destinations"]) == [] and row["lane"] == "method"


def as_list(value) -> list:
    """A JSON list column as a list (queue() may have decoded it already)."""
    return json.loads(value) if isinstance(value, str) else list(value)


def dicom_file_bytes(ds) -> bytes:
    """``ds`` written as a DICOM file (preamble, meta, dataset)."""
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dropped_instance_logs_outcome_dropped(node):
    """A drop route's instance logs stage_receive with outcome=dropped, not stored."""
    n = node()
    with capture_logs() as logs:
        status = scp.handle_store(fake_event(make_mg(SeriesDescription="JUNK 1")), n.service)
    assert status == StoreStatus.SUCCESS
    [event] = [e for e in logs if e["event"] == "stage_receive"]
    assert event["outcome"] == "dropped" and event["lane"] == "none"


def test_drop_route_stores_nothing(node):
    """A drop route acknowledges, records `dropped`, and writes no file."""
    n = node()
    _, status = store(n.port, make_mg(SeriesDescription="JUNK SERIES"))
    assert status == StoreStatus.SUCCESS
    assert n.ledger.counts() == {"dropped": 1}
    assert list(n.spool.incoming.iterdir()) == []


def test_echo(node):
    """C-ECHO answers Success."""
    n = node()
    ae = AE(ae_title="ANY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", n.port, ae_title="MR2NST")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()


def test_allowlist_rejects_unknown_caller(node):
    """A caller not on the allowlist is rejected at association; listed ones get in."""
    n = node(allowed_callers=["GOODMOD", "PACS@127.0.0.1", "FAR@10.9.9.9"])
    assoc, _ = store(n.port, make_mg(), calling="BADMOD")
    assert assoc.is_rejected
    assoc, _ = store(n.port, make_mg(), calling="FAR")
    assert assoc.is_rejected
    _, status = store(n.port, make_mg(), calling="PACS")
    assert status == StoreStatus.SUCCESS
    instances = {k: v for k, v in n.ledger.counts().items() if not k.startswith("delivery_")}
    assert instances == {"received": 1}


def test_low_disk_refused_with_a700(node):
    """Below min_free_disk_mb the store is refused with 0xA700 and nothing is kept."""
    n = node(min_free_disk_mb=10**12)
    _, status = store(n.port, make_mg())
    assert status == StoreStatus.OUT_OF_RESOURCES
    assert n.ledger.counts() == {} and list(n.spool.incoming.iterdir()) == []


def fake_event(ds, *, abstract=None, affected=None, raise_on_dataset=False):
    """A stand-in for pynetdicom's EVT_C_STORE event carrying ``ds``."""

    class Ev:
        @property
        def dataset(self):
            if raise_on_dataset:
                raise ValueError("garbled")
            return ds

        def encoded_dataset(self, include_meta=True):
            return b"\x00" * 128 + b"DICM"

    ev = Ev()
    ev.assoc = SimpleNamespace(
        requestor=SimpleNamespace(ae_title="MOD", address="127.0.0.1"),
        acceptor=SimpleNamespace(ae_title="MR2NST"),
    )
    ev.context = SimpleNamespace(
        abstract_syntax=abstract or ds.SOPClassUID, transfer_syntax=ExplicitVRLittleEndian
    )
    ev.request = SimpleNamespace(
        AffectedSOPInstanceUID=affected or ds.SOPInstanceUID,
        DataSet=BytesIO(encode(ds, False, True)),  # explicit VR little endian, as the context
    )
    return ev


def test_sop_class_mismatch_a900(node):
    """A dataset whose SOP Class differs from the negotiated one gets 0xA900."""
    n = node()
    assert (
        scp.handle_store(fake_event(make_mg(), abstract=CTImageStorage), n.service)
        == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    )
    assert n.ledger.counts() == {}


def test_undecodable_dataset_c000(node):
    """A dataset that cannot be decoded gets 0xC000 and leaves nothing behind."""
    n = node()
    assert (
        scp.handle_store(fake_event(make_mg(), raise_on_dataset=True), n.service)
        == StoreStatus.CANNOT_UNDERSTAND
    )
    assert list(n.spool.incoming.iterdir()) == []


def test_ledger_failure_refuses_and_removes_file(node, monkeypatch):
    """If the ledger insert fails, the store is refused (0xA700) and the file removed."""
    n = node()

    def broken(_rec):
        raise RuntimeError("db down")

    monkeypatch.setattr(n.ledger, "record", broken)
    assert scp.handle_store(fake_event(make_mg()), n.service) == StoreStatus.OUT_OF_RESOURCES
    assert list(n.spool.incoming.iterdir()) == []


def test_max_associations_rejects_extra_caller(node):
    """Beyond node.max_associations a new association is rejected (transient)."""
    n = node(max_associations=1)
    first = AE(ae_title="ONE")
    first.add_requested_context(Verification)
    held = first.associate("127.0.0.1", n.port, ae_title="MR2NST")
    assert held.is_established
    second = AE(ae_title="TWO")
    second.add_requested_context(Verification)
    extra = second.associate("127.0.0.1", n.port, ae_title="MR2NST")
    assert extra.is_rejected
    held.release()
