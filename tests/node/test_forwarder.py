"""Tests of the forwarder: outcomes, backoff, dead deliveries and cleanup."""

import random

import pytest
from structlog.testing import capture_logs

from mr2nst.node.config import parse_config
from mr2nst.node.ledger import Ledger, Received
from mr2nst.node.service.destinations import SendResult, classify
from mr2nst.node.service.forwarder import Forwarder, backoff_delay
from mr2nst.node.service.spool import Spool

INITIAL_S, MAX_S = 5.0, 600.0


class FakeClock:
    """Epoch seconds that move only when a test advances them."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeDestination:
    """A destination that answers with the given results in turn and records what it sent."""

    def __init__(self, results):
        self.name = "cad"
        self.results = list(results)
        self.sent: list[str] = []

    def send(self, path):
        self.sent.append(path)
        return self.results.pop(0)


@pytest.fixture
def clock():
    """A fake clock shared by the ledger and the forwarder under test."""
    return FakeClock()


@pytest.fixture
def setup(tmp_path, clock):
    """Config (3 attempts, 5-600 s backoff, 1 h retention), spool and a fake-clocked ledger."""
    cfg = parse_config(
        {
            "node": {"data_dir": str(tmp_path / "d"), "retention_hours": 1},
            "forwarding": {
                "max_attempts": 3,
                "backoff_initial_s": INITIAL_S,
                "backoff_max_s": MAX_S,
                "poll_s": 3600,
            },
        },
        environ={},
    )
    spool = Spool(cfg.node.data_dir).create()
    ledger = Ledger.open(cfg.ledger_url, clock=clock)
    yield cfg, spool, ledger
    ledger.close()


def transformed(ledger, spool, dests=("cad",)):
    src = spool.write_incoming(b"source")
    job_id = ledger.record(
        Received(
            "1.2",
            "1.2.3",
            "1",
            "2",
            "1.2.840.10008.1.2.1",
            "MOD",
            "MR2NST",
            "127.0.0.1",
            "r",
            "normalize",
            "passthrough",
            tuple(dests),
            "received",
            str(src),
        )
    )
    ledger.claim_job("w", 30)
    out = spool.write(spool.outbox, "out.dcm", lambda fh: fh.write(b"derived") and None)
    ledger.mark_transformed(
        job_id,
        "w",
        output_path=str(out),
        out_series_uid="9",
        out_sop_uid="9.1",
        destinations=list(dests),
    )
    return job_id, src, out


def drain(fwd, ledger):
    """Deliver everything due now, synchronously."""
    jobs = ledger.claim_deliveries(fwd.owner, 10, 60)
    return [fwd.deliver(job) for job in jobs]


def test_classify_statuses():
    """Peer statuses map to sent, transient or permanent failures."""
    assert classify(0x0000).ok and classify(0xB007).ok
    assert not classify(0xA700).permanent
    assert classify(0xA900).permanent and classify(0xC123).permanent and classify(0x0122).permanent


def test_backoff_grows_with_jitter_and_cap():
    """Delays double per attempt, stay within [d/2, d] and never pass the cap."""
    rng = random.Random(1)
    for attempt, d in [(1, 5), (2, 10), (3, 20), (10, 600)]:
        delays = [backoff_delay(attempt, 5, 600, rng) for _ in range(50)]
        assert all(d / 2 <= x <= d for x in delays) and len(set(delays)) > 1


def test_transient_failures_retry_until_dead(setup, clock):
    """A failing destination is retried after a growing backoff, max_attempts times, then dead."""
    cfg, spool, ledger = setup
    dest = FakeDestination([SendResult(False, None, False, "down")] * 3)
    fwd = Forwarder(cfg, ledger, spool, {"cad": dest}, rng=random.Random(1), clock=clock)
    transformed(ledger, spool)
    states = []
    for attempt in (1, 2, 3):
        with capture_logs() as logs:
            assert len(drain(fwd, ledger)) == 1
        [delivery] = ledger.queue()[0]["deliveries"]
        [event] = [e for e in logs if e["event"] == "stage_forward"]
        assert event["outcome"] == delivery["state"] and event["attempt"] == attempt
        states.append(delivery["state"])
        if delivery["state"] != "failed":
            assert event["retry_in_s"] is None
            continue
        due = delivery["next_attempt_at"]
        cap = min(MAX_S, INITIAL_S * 2 ** (attempt - 1))
        assert cap / 2 <= due - clock() <= cap and event["retry_in_s"] == round(due - clock(), 1)
        clock.now = due - 0.5
        assert drain(fwd, ledger) == []  # not due before its backoff has passed
        clock.now = due
    assert states == ["failed", "failed", "dead"] and len(dest.sent) == 3


def test_permanent_rejection_is_dead_at_once_and_retry_revives(setup, clock):
    """A 0xC000 rejection makes the delivery dead; queue retry sends it again."""
    cfg, spool, ledger = setup
    dest = FakeDestination([SendResult(False, 0xC000, True, "rejected"), SendResult(True, 0)])
    fwd = Forwarder(cfg, ledger, spool, {"cad": dest}, clock=clock)
    transformed(ledger, spool)
    drain(fwd, ledger)
    assert ledger.queue()[0]["deliveries"][0]["state"] == "dead"
    clock.advance(MAX_S)
    assert drain(fwd, ledger) == []  # dead deliveries are not retried by time alone
    assert ledger.retry() == 1
    drain(fwd, ledger)
    assert ledger.counts()["done"] == 1 and len(dest.sent) == 2


def test_cleanup_removes_only_settled_files(setup, clock):
    """Cleanup removes files of done instances after the retention; waiting ones are kept."""
    cfg, spool, ledger = setup
    dest = FakeDestination([SendResult(True, 0)])
    fwd = Forwarder(cfg, ledger, spool, {"cad": dest}, clock=clock)
    _, src1, out1 = transformed(ledger, spool)
    drain(fwd, ledger)
    waiting_src = spool.write_incoming(b"other")
    ledger.record(
        Received(
            "1.2",
            "1.2.4",
            "1",
            "2",
            "ts",
            "MOD",
            "MR2NST",
            "p",
            "r",
            "normalize",
            "passthrough",
            ("cad",),
            "received",
            str(waiting_src),
        )
    )
    assert fwd.cleanup() == 0 and src1.exists() and out1.exists()  # still within the retention
    clock.advance(cfg.node.retention_hours * 3600 + 1)
    assert fwd.cleanup() == 2
    assert not src1.exists() and not out1.exists() and waiting_src.exists()


def test_duplicate_and_dimse_warnings_count_as_delivered():
    """0x0111 (peer already has the instance) and DIMSE warnings are delivered, not retried."""
    assert all(classify(s).ok for s in (0x0111, 0x0001, 0x0107, 0x0116))


def test_exception_in_send_is_a_counted_attempt(setup, clock):
    """A destination that raises is recorded as a failed attempt, so max_attempts still applies."""
    cfg, spool, ledger = setup

    class Broken:
        name = "cad"

        def send(self, path):
            raise ValueError("cannot encode")

    fwd = Forwarder(cfg, ledger, spool, {"cad": Broken()}, clock=clock)
    transformed(ledger, spool)
    for _ in range(3):
        [job] = ledger.claim_deliveries(fwd.owner, 10, 60)
        fwd.handle(job)
        clock.advance(MAX_S)  # past any backoff
    [delivery] = ledger.queue()[0]["deliveries"]
    assert (
        delivery["state"] == "dead"
        and delivery["attempts"] == 3
        and "cannot encode" in delivery["error"]
    )


def test_stop_hands_back_unstarted_deliveries(setup, clock):
    """A delivery claimed but not started when the forwarder stops is released, unattempted."""
    cfg, spool, ledger = setup
    dest = FakeDestination([])
    fwd = Forwarder(cfg, ledger, spool, {"cad": dest}, clock=clock)
    transformed(ledger, spool)
    [job] = ledger.claim_deliveries(fwd.owner, 10, 60)
    fwd.start()
    assert not fwd.stopping
    fwd.stop()
    assert fwd.stopping
    fwd.handle(job)
    [delivery] = ledger.queue()[0]["deliveries"]
    assert delivery["state"] == "pending" and delivery["attempts"] == 0 and dest.sent == []
    assert fwd.dispatch() == 0  # a stopped forwarder claims nothing more


def test_original_payload_sends_the_received_file(setup, clock):
    """A forward's delivery sends the spooled original; a derived one sends the output."""
    cfg, spool, ledger = setup
    dest = FakeDestination([SendResult(True, 0), SendResult(True, 0)])
    fwd = Forwarder(cfg, ledger, spool, {"cad": dest}, clock=clock)
    original = spool.write_incoming(b"original")
    fwd_id = ledger.record(
        Received(
            "1.2",
            "1.2.9",
            "1",
            "2",
            "ts",
            "MOD",
            "MR2NST",
            "p",
            "r",
            "forward",
            None,
            ("cad",),
            "received",
            str(original),
        )
    )
    with capture_logs() as logs:
        drain(fwd, ledger)
    assert dest.sent == [str(original)]
    assert [e["payload"] for e in logs if e["event"] == "stage_forward"] == ["original"]
    _, _, out = transformed(ledger, spool)
    drain(fwd, ledger)
    assert dest.sent == [str(original), str(out)]
    assert ledger.counts()["done"] == 2 and ledger.history(fwd_id)[0]["outcome"] == "sent"


def test_every_delivery_attempt_is_in_the_history(setup, clock):
    """Failed and successful attempts are recorded with status, reason and duration."""
    cfg, spool, ledger = setup
    dest = FakeDestination(
        [SendResult(False, 0xA700, False, "out of resources"), SendResult(True, 0)]
    )
    fwd = Forwarder(cfg, ledger, spool, {"cad": dest}, clock=clock)
    job_id, _, _ = transformed(ledger, spool)
    drain(fwd, ledger)
    clock.advance(MAX_S)
    drain(fwd, ledger)
    rows = [h for h in ledger.history(job_id) if h["stage"] == "deliver"]
    assert [(h["outcome"], h["status"], h["reason"]) for h in rows] == [
        ("failed", 0xA700, "out of resources"),
        ("sent", 0, None),
    ]
    assert all(h["destination"] == "cad" and h["seconds"] >= 0 for h in rows)
