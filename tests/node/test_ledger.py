"""Tests of the ledger: states, leases, claims, deliveries and admin operations."""

import threading

import pytest
from support import fresh_postgres, postgres_url

from mr2nst.node.errors import LedgerError
from mr2nst.node.ledger import DeliveryState, InstanceState, Ledger, Received
from mr2nst.node.ledger.schema import SCHEMA_VERSION


class Clock:
    """A fake clock for the ledger: time moves only when a test sets ``t``."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    """A fake clock at a fixed time."""
    return Clock()


BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(
            postgres_url() is None, reason="no PostgreSQL server (run under pg_virtualenv)"
        ),
    ),
]


@pytest.fixture(params=BACKENDS)
def ledger(request, tmp_path, clock):
    """A fresh ledger on SQLite, and on PostgreSQL where a server is available."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if request.param == "sqlite" else fresh_postgres()
    led = Ledger.open(url, clock=clock)
    yield led
    led.close()


def received(
    n: int = 0, action="normalize", dests=("cad",), state=InstanceState.RECEIVED
) -> Received:
    """The record of a received instance number ``n``."""
    return Received(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
        sop_instance_uid=f"1.2.3.{n}",
        study_uid="1.2",
        series_uid="1.2.3",
        transfer_syntax="1.2.840.10008.1.2.1",
        calling_ae="MOD",
        called_ae="MR2NST",
        peer="127.0.0.1",
        route="r",
        action=action,
        method="passthrough",
        destinations=tuple(dests),
        state=state,
        spool_path=f"/spool/{n}.dcm",
    )


def test_schema_version_recorded_and_reopen_is_noop(tmp_path, clock):
    """Opening twice keeps one schema version row and the data."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    first = Ledger.open(url, clock=clock)
    first.record(received())
    first.close()
    again = Ledger.open(url, clock=clock)
    with again.engine.connect() as conn:
        versions = [r[0] for r in conn.exec_driver_sql("SELECT version FROM schema_version")]
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert versions == list(range(1, SCHEMA_VERSION + 1)) and mode == "wal"
    assert again.counts() == {"received": 1}


def test_newer_schema_refused(tmp_path, clock):
    """A ledger written by a newer mr2nst is refused with a clear error."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    led = Ledger.open(url, clock=clock)
    with led.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO schema_version VALUES (99, 0)")
    led.close()
    with pytest.raises(LedgerError, match="newer"):
        Ledger.open(url, clock=clock)


def test_states_are_stored_as_their_names(ledger):
    """Instance and delivery states reach the database as their plain lowercase strings."""
    job_id = ledger.record(received())
    ledger.claim_job("w", 30)
    ledger.mark_transformed(
        job_id, "w", output_path="p", out_series_uid=None, out_sop_uid=None, destinations=["cad"]
    )
    with ledger.engine.connect() as conn:
        instance_state = conn.exec_driver_sql("SELECT state FROM instances").scalar_one()
        delivery_state = conn.exec_driver_sql("SELECT state FROM deliveries").scalar_one()
    assert (instance_state, delivery_state) == ("transformed", "pending")
    assert (
        type(instance_state) is str and InstanceState(instance_state) is InstanceState.TRANSFORMED
    )
    assert ledger.counts() == {"transformed": 1, f"delivery_{DeliveryState.PENDING}": 1}


def test_renewed_lease_keeps_the_job_until_it_lapses(ledger, clock):
    """A renewed lease outlives the first; once it lapses the job is reclaimed, renewal fails."""
    job_id = ledger.record(received())
    ledger.claim_job("w1", 30)
    clock.t += 20
    assert ledger.renew_lease(job_id, "w1", 30)
    clock.t += 20  # past the first lease, within the renewed one
    assert ledger.claim_job("w2", 30) is None
    clock.t += 11
    assert ledger.claim_job("w2", 30).id == job_id
    assert not ledger.renew_lease(job_id, "w1", 30)


def test_claim_is_exclusive_and_ordered(ledger):
    """Jobs are claimed oldest first and never twice."""
    ids = [ledger.record(received(i)) for i in range(3)]
    a = ledger.claim_job("w1", 30)
    b = ledger.claim_job("w2", 30)
    assert (a.id, b.id) == (ids[0], ids[1]) and a.attempts == 1
    assert ledger.claim_job("w3", 30).id == ids[2]
    assert ledger.claim_job("w4", 30) is None


def test_concurrent_claims_never_share_a_job(ledger):
    """Many threads claiming at once get distinct jobs."""
    for i in range(40):
        ledger.record(received(i))
    got: list[int] = []
    lock = threading.Lock()

    def grab(name):
        while (job := ledger.claim_job(name, 30)) is not None:
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=grab, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(set(got)) and len(got) == 40


def test_expired_lease_is_reclaimed(ledger, clock):
    """A job whose worker died goes back to the queue once its lease expires."""
    job_id = ledger.record(received())
    ledger.claim_job("dead-worker", 30)
    assert ledger.claim_job("w2", 30) is None
    clock.t += 31
    job = ledger.claim_job("w2", 30)
    assert job.id == job_id and job.attempts == 2
    assert not ledger.mark_transformed(
        job_id,
        "dead-worker",
        output_path="x",
        out_series_uid=None,
        out_sop_uid=None,
        destinations=["cad"],
    )


def test_transform_creates_deliveries_and_done_after_all_sent(ledger):
    """Deliveries are created per destination; the instance is done when all are sent."""
    job_id = ledger.record(received(dests=("a", "b")))
    ledger.claim_job("w", 30)
    assert ledger.mark_transformed(
        job_id,
        "w",
        output_path="/out/x.dcm",
        out_series_uid="9.1",
        out_sop_uid="9.2",
        destinations=["a", "b"],
    )
    claimed = ledger.claim_deliveries("f", 10, 60)
    assert {d.destination for d in claimed} == {"a", "b"} and claimed[0].path == "/out/x.dcm"
    ledger.mark_sent(claimed[0].id, 0)
    assert ledger.counts()["transformed"] == 1
    ledger.mark_sent(claimed[1].id, 0)
    assert ledger.counts()["done"] == 1


def test_failed_delivery_waits_for_backoff_then_dead_and_retry(ledger, clock):
    """A failed delivery is due only at its retry time; dead ones come back with queue retry."""
    job_id = ledger.record(received())
    ledger.claim_job("w", 30)
    ledger.mark_transformed(
        job_id, "w", output_path="p", out_series_uid=None, out_sop_uid=None, destinations=["cad"]
    )
    [d] = ledger.claim_deliveries("f", 10, 60)
    ledger.mark_delivery_failed(d.id, None, "down", retry_at=clock.t + 10)
    assert ledger.claim_deliveries("f", 10, 60) == []
    clock.t += 11
    [d2] = ledger.claim_deliveries("f", 10, 60)
    assert d2.attempts == 2
    assert ledger.mark_delivery_failed(d2.id, 0xC000, "rejected", retry_at=None) == "dead"
    clock.t += 10_000
    assert ledger.claim_deliveries("f", 10, 60) == []
    assert ledger.retry() == 1
    [d3] = ledger.claim_deliveries("f", 10, 60)
    assert d3.attempts == 1


def test_job_error_retries_then_fails(ledger, clock):
    """A transient processing error requeues with a delay; at max attempts it fails."""
    job_id = ledger.record(received())
    ledger.claim_job("w", 30)
    assert (
        ledger.mark_job_error(job_id, "w", "boom", permanent=False, max_attempts=2, retry_in_s=5)
        == "received"
    )
    assert ledger.claim_job("w", 30) is None
    clock.t += 6
    ledger.claim_job("w", 30)
    assert (
        ledger.mark_job_error(job_id, "w", "boom", permanent=False, max_attempts=2, retry_in_s=5)
        == "failed"
    )
    assert ledger.queue()[0]["error"] == "boom"


def test_settled_files_excludes_open_and_failed(ledger, clock):
    """Cleanup never offers files with open deliveries, nor failed jobs unless purging."""
    open_id = ledger.record(received(1))
    ledger.claim_job("w", 30)
    ledger.mark_transformed(
        open_id, "w", output_path="o1", out_series_uid=None, out_sop_uid=None, destinations=["cad"]
    )
    failed_id = ledger.record(received(2))
    ledger.claim_job("w", 30)
    ledger.mark_job_error(failed_id, "w", "bad", permanent=True, max_attempts=3, retry_in_s=0)
    assert ledger.settled_files(older_than=clock.t + 100) == []
    assert [r["id"] for r in ledger.purge()] == [failed_id]


def test_queue_listing_has_deliveries(ledger):
    """queue() shows unfinished instances with their deliveries."""
    job_id = ledger.record(received())
    ledger.claim_job("w", 30)
    ledger.mark_transformed(
        job_id, "w", output_path="p", out_series_uid=None, out_sop_uid=None, destinations=["cad"]
    )
    [row] = ledger.queue()
    assert row["state"] == "transformed" and row["deliveries"][0]["destination"] == "cad"
    assert row["destinations"] == ["cad"]


def test_unusable_url_is_a_ledger_error(tmp_path):
    """A URL SQLAlchemy cannot use, or a database it cannot open, gives LedgerError, not a crash."""
    with pytest.raises(LedgerError, match="cannot use ledger URL"):
        Ledger.open("nosuchdialect://x")
    with pytest.raises(LedgerError, match="cannot open ledger"):
        Ledger.open(f"sqlite:///{tmp_path}/missing-dir/ledger.db")
