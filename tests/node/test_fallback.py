"""Tests of route fallbacks and forward_original: nothing acknowledged is ever stranded.

Each instance goes the way the SCP sends it (route decision -> ledger record), a real
worker processes it, and the forwarder delivers to a fake destination that keeps the
bytes it was given.
"""

from pathlib import Path

import pydicom
import pytest
from structlog.testing import capture_logs
from support import write_phantom

from mr2nst.node.config import parse_config
from mr2nst.node.errors import SafetyGateError
from mr2nst.node.ledger import InstanceState, Ledger, Received
from mr2nst.node.service import safety
from mr2nst.node.service.destinations import SendResult
from mr2nst.node.service.forwarder import Forwarder
from mr2nst.node.service.routing import Router
from mr2nst.node.service.spool import Spool
from mr2nst.node.service.worker import Worker

DESTINATIONS = ("cad", "pacs", "archive")


class Clock:
    """A fake clock shared by the ledger and the forwarder: time moves when a test says so."""

    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class Peer:
    """A destination that keeps the bytes of every file it is given; fails while ``down``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.down = False
        self.received: list[bytes] = []

    def send(self, path: str) -> SendResult:
        if self.down:
            return SendResult(False, None, False, "connection refused")
        self.received.append(Path(path).read_bytes())
        return SendResult(True, 0)


class Node:
    """Router, ledger, worker and forwarder of one config, driven step by step."""

    def __init__(
        self, tmp_path: Path, bank_root: Path | None, references: int, **route: object
    ) -> None:
        self.clock = Clock()
        self.cfg = parse_config(
            {
                "node": {"data_dir": str(tmp_path / "data")},
                "bank": {"path": str(bank_root or tmp_path / "no-bank")},
                "methods": {"references": references},
                "workers": {"max_attempts": 2},
                "routes": [
                    {
                        "name": "mg",
                        "match": {"Modality": "MG"},
                        "method": "ehm",
                        "destinations": ["cad"],
                        **route,
                    }
                ],
                "destinations": {
                    n: {"ae_title": n.upper(), "host": "127.0.0.1", "port": 1} for n in DESTINATIONS
                },
            },
            environ={},
        )
        self.spool = Spool(self.cfg.node.data_dir).create()
        self.ledger = Ledger.open(self.cfg.ledger_url, clock=self.clock)
        self.worker = Worker(self.cfg, self.ledger, self.spool, "t")
        self.peers = {n: Peer(n) for n in DESTINATIONS}
        self.forwarder = Forwarder(self.cfg, self.ledger, self.spool, self.peers, clock=self.clock)

    def receive(self, path: Path) -> int:
        """Spool and record the file as the SCP does; returns the job id."""
        ds = pydicom.dcmread(path)
        d = Router(self.cfg.routes).decide(ds, "MOD", "MR2NST")
        spooled = self.spool.write_incoming(path.read_bytes())
        return self.ledger.record(
            Received(
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.file_meta.TransferSyntaxUID),
                "MOD",
                "MR2NST",
                "127.0.0.1",
                d.route,
                d.action,
                d.method,
                d.destinations,
                InstanceState.RECEIVED,
                str(spooled),
                priority=d.priority,
                fallback_destinations=d.fallback,
                forward_original=d.forward_original,
            )
        )

    def send_due(self) -> int:
        """Deliver every due delivery now; returns how many were attempted."""
        jobs = self.ledger.claim_deliveries(self.forwarder.owner, 10, 60)
        for job in jobs:
            self.forwarder.deliver(job)
        return len(jobs)

    def row(self, job_id: int) -> dict:
        """The instance's ledger row with its deliveries."""
        [row] = [r for r in self.ledger.queue(include_done=True) if r["id"] == job_id]
        return row

    def close(self) -> None:
        self.ledger.close()


@pytest.fixture
def make_node(tmp_path):
    """Builds a Node (route keys as keyword arguments) and closes it after the test."""
    nodes: list[Node] = []

    def build(bank=None, references=2, **route):
        node = Node(tmp_path, None if bank is None else bank.layout.root, references, **route)
        nodes.append(node)
        return node

    yield build
    for node in nodes:
        node.close()


def ge_image(tmp_path: Path, name: str = "g", **overrides) -> Path:
    """A GE phantom mammogram file (``overrides`` set attributes; None deletes)."""
    return write_phantom(tmp_path / "ge", name, vendor="GE", view="CC", **overrides)


def gate_fails(monkeypatch) -> None:
    """Make the safety gate refuse every output (as a failing [safety] check would)."""

    def refuse(source, output, settings):
        raise SafetyGateError("safety.mask_overlap", "breast mask overlap 0.41 < 0.98")

    monkeypatch.setattr(safety, "check_output", refuse)


CAUSES = {
    # cause: (image overrides, config changes, expected reason prefix)
    "view-ML": ({"ViewPosition": "ML"}, {}, "method.refused: NotEnoughReferences"),
    "too-few-references": ({}, {"references": 9}, "method.refused: NotEnoughReferences"),
    "method-refusal": (
        {"ImagerPixelSpacing": None, "PixelSpacing": None},
        {},
        "method.refused: UnsupportedImageError",
    ),
    "safety-gate": ({}, {"gate": "fails"}, "safety.mask_overlap: breast mask overlap 0.41"),
}


@pytest.mark.parametrize("cause", list(CAUSES))
def test_cause_falls_back_to_the_original(cause, make_node, bank, tmp_path, monkeypatch):
    """Each cause of a failed normalization sends the original unchanged and records why."""
    overrides, changes, reason = CAUSES[cause]
    if changes.get("gate") == "fails":
        gate_fails(monkeypatch)
    node = make_node(bank, references=changes.get("references", 2))
    src = ge_image(tmp_path, **overrides)
    job_id = node.receive(src)
    with capture_logs() as logs:
        assert node.worker.run_once()
    row = node.row(job_id)
    assert row["state"] == "transformed" and row["fallback_reason"].startswith(reason)
    assert Path(row["spool_path"]).parent == node.spool.incoming  # not buried in dead/
    [event] = [e for e in logs if e["event"] == "stage_transform"]
    assert event["outcome"] == "fallback" and event["reason"] == row["fallback_reason"]
    assert node.send_due() == 1
    assert node.peers["cad"].received == [src.read_bytes()]  # the original, byte for byte
    row = node.row(job_id)
    assert row["state"] == "done" and row["deliveries"][0]["destination"] == "cad"
    stages = [(h["stage"], h["outcome"]) for h in node.ledger.history(job_id)]
    assert stages == [
        ("transform", "fallback"),
        ("fallback", "forward-original"),
        ("deliver", "sent"),
    ]


def test_spent_attempts_fall_back_as_method_failed(make_node, tmp_path, monkeypatch):
    """A transient error that outlasts workers.max_attempts falls back as method.failed."""
    node = make_node(method="passthrough")

    def boom(*_a, **_k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(node.worker.pipeline, "derive", boom)
    job_id = node.receive(ge_image(tmp_path))
    assert node.worker.run_once() and node.row(job_id)["state"] == "received"
    node.clock.t += 300
    assert node.worker.run_once()
    row = node.row(job_id)
    assert row["state"] == "transformed"
    assert row["fallback_reason"] == "method.failed: RuntimeError: CUDA out of memory"
    assert [(h["stage"], h["outcome"]) for h in node.ledger.history(job_id)][:2] == [
        ("transform", "requeued"),
        ("transform", "fallback"),
    ]


def test_fallback_destinations_replace_the_route_destinations(make_node, tmp_path):
    """fallback_destinations, when set, receive the original instead of the destinations."""
    node = make_node(fallback_destinations=["pacs", "archive"])
    src = ge_image(tmp_path, ViewPosition="ML")  # no bank at all: the method refuses
    job_id = node.receive(src)
    node.worker.run_once()
    assert node.send_due() == 2
    assert node.peers["cad"].received == []
    assert node.peers["pacs"].received == node.peers["archive"].received == [src.read_bytes()]
    assert node.row(job_id)["state"] == "done"


def test_hold_keeps_the_job_failed_and_retry_still_works(make_node, bank, tmp_path, monkeypatch):
    """on_failure = hold sends nothing, buries the source in dead/, and queue retry redoes it."""
    gate_fails(monkeypatch)
    node = make_node(bank, on_failure="hold")
    job_id = node.receive(ge_image(tmp_path))
    with capture_logs() as logs:
        node.worker.run_once()
    row = node.row(job_id)
    assert row["state"] == "failed" and row["deliveries"] == [] and row["fallback_reason"] is None
    assert Path(row["spool_path"]).parent == node.spool.dead
    assert "safety.mask_overlap" in row["error"]
    [event] = [e for e in logs if e["event"] == "stage_transform"]
    assert event["outcome"] == "failed" and event["reason"].startswith("safety.mask_overlap")
    assert node.send_due() == 0
    monkeypatch.undo()  # the gate passes again
    monkeypatch.setattr(safety, "check_output", lambda *_a: None)
    assert node.ledger.retry([job_id]) == 1
    assert node.worker.run_once()
    assert node.row(job_id)["state"] == "transformed"
    assert node.send_due() == 1 and len(node.peers["cad"].received) == 1
    derived = node.peers["cad"].received[0]
    assert derived != Path(row["spool_path"]).read_bytes()  # the normalized output this time
    assert node.row(job_id)["state"] == "done"


def test_passthrough_is_not_gated(make_node, tmp_path, monkeypatch):
    """passthrough (pixels unchanged) skips the safety gate; other methods do not."""
    gate_fails(monkeypatch)
    node = make_node(method="passthrough")
    job_id = node.receive(ge_image(tmp_path))
    node.worker.run_once()
    row = node.row(job_id)
    assert row["state"] == "transformed" and row["fallback_reason"] is None


def test_forward_original_goes_at_once_and_the_derived_later(make_node, tmp_path):
    """forward_original sends the original before any worker runs; the derived follows."""
    node = make_node(method="passthrough", forward_original=["archive"])
    src = ge_image(tmp_path)
    job_id = node.receive(src)
    assert node.send_due() == 1  # before the worker: the original only
    assert node.peers["archive"].received == [src.read_bytes()]
    assert node.row(job_id)["state"] == "received"
    assert node.worker.run_once()
    assert node.send_due() == 1
    [derived] = node.peers["cad"].received
    out = pydicom.dcmread(pydicom.filebase.DicomBytesIO(derived))
    assert out.ImageType[0] == "DERIVED"
    row = node.row(job_id)
    assert row["state"] == "done"
    assert {(d["destination"], d["state"]) for d in row["deliveries"]} == {
        ("archive", "sent"),
        ("cad", "sent"),
    }


def test_forward_original_and_derived_retry_on_their_own(make_node, tmp_path):
    """A destination that is down delays only its own delivery; each is retried alone."""
    node = make_node(method="passthrough", forward_original=["archive"])
    node.peers["archive"].down = True
    src = ge_image(tmp_path)
    job_id = node.receive(src)
    node.send_due()
    node.worker.run_once()
    node.send_due()  # the derived goes; the original waits for its retry
    assert len(node.peers["cad"].received) == 1 and node.peers["archive"].received == []
    row = node.row(job_id)
    assert row["state"] == "transformed"
    assert {d["destination"]: d["state"] for d in row["deliveries"]} == {
        "archive": "failed",
        "cad": "sent",
    }
    node.peers["archive"].down = False
    node.clock.t += 600
    assert node.send_due() == 1
    assert node.peers["archive"].received == [src.read_bytes()]
    assert node.row(job_id)["state"] == "done"
    deliveries = [
        (h["destination"], h["outcome"])
        for h in node.ledger.history(job_id)
        if h["stage"] == "deliver"
    ]
    assert deliveries == [("archive", "failed"), ("cad", "sent"), ("archive", "sent")]


def test_forward_original_with_a_fallback_sends_one_copy(make_node, tmp_path):
    """A fallback to a destination that already got the original adds no second copy."""
    node = make_node(forward_original=["archive"], fallback_destinations=["cad", "archive"])
    src = ge_image(tmp_path, ViewPosition="ML")
    job_id = node.receive(src)
    node.send_due()
    node.worker.run_once()
    node.send_due()
    assert node.peers["archive"].received == node.peers["cad"].received == [src.read_bytes()]
    assert node.row(job_id)["state"] == "done"
