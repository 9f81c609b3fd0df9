"""Tests of the ledger: states, leases, claims, deliveries and admin operations."""

import threading

import pytest
from support import fresh_postgres, postgres_url

from mr2nst.node.errors import LedgerError
from mr2nst.node.ledger import LIGHT_LANES, DeliveryState, InstanceState, Ledger, Received
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
    n: int = 0,
    action="normalize",
    dests=("cad",),
    state=InstanceState.RECEIVED,
    **route,
) -> Received:
    """The record of a received instance number ``n`` (``route``: priority, fallback, ...)."""
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
        destinations=tuple(dests),
        state=state,
        spool_path=f"/spool/{n}.dcm",
        **{"method": "passthrough", **route},
    )


def transform(ledger, job_id, dests=("cad",), owner="w"):
    """Claim the next job (it must be ``job_id``) and record its output ``/out/<id>.dcm``."""
    assert ledger.claim_job(owner, 30).id == job_id
    assert ledger.mark_transformed(
        job_id,
        owner,
        output_path=f"/out/{job_id}.dcm",
        out_series_uid="9.1",
        out_sop_uid="9.2",
        destinations=list(dests),
    )


def state_of(ledger, job_id) -> str:
    """The instance's state."""
    [row] = [r for r in ledger.queue(include_done=True) if r["id"] == job_id]
    return row["state"]


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


def test_forward_instance_goes_straight_to_the_forwarder(ledger):
    """A forward is recorded transformed with original deliveries; no worker ever claims it."""
    job_id = ledger.record(received(action="forward", dests=("cad", "pacs")))
    assert state_of(ledger, job_id) == "transformed"
    assert ledger.claim_job("w", 30) is None
    sends = ledger.claim_deliveries("f", 10, 60)
    assert {d.destination for d in sends} == {"cad", "pacs"}
    assert all(d.payload == "original" and d.path == "/spool/0.dcm" for d in sends)
    for d in sends:
        ledger.mark_sent(d.id, 0)
    assert state_of(ledger, job_id) == "done"
    assert [h["outcome"] for h in ledger.history(job_id)] == ["sent", "sent"]


def test_drop_and_unrouted_are_in_no_lane(ledger):
    """Dropped and unrouted instances are lane none: no worker, no delivery."""
    ledger.record(received(1, action="drop", dests=(), state=InstanceState.DROPPED))
    ledger.record(received(2, action="none", dests=(), state=InstanceState.UNROUTED))
    with ledger.engine.connect() as conn:
        lanes = [r[0] for r in conn.exec_driver_sql("SELECT lane FROM instances ORDER BY id")]
    assert lanes == ["none", "none"]
    assert ledger.claim_job("w", 30) is None and ledger.claim_deliveries("f", 10, 60) == []


def test_higher_priority_is_claimed_first(ledger):
    """Workers take the highest route priority first, then the oldest within a priority."""
    low = ledger.record(received(0, priority=0))
    high_a = ledger.record(received(1, priority=5))
    negative = ledger.record(received(2, priority=-3))
    high_b = ledger.record(received(3, priority=5))
    order = [ledger.claim_job(f"w{i}", 30).id for i in range(4)]
    assert order == [high_a, high_b, low, negative]
    assert ledger.claim_job("w", 30) is None


def test_light_worker_takes_only_light_jobs(ledger):
    """A light worker never claims an mr2nst job; a worker of every lane takes either."""
    heavy = ledger.record(received(0, method="mr2nst"))
    light = ledger.record(received(1, method="ehm"))
    assert ledger.claim_job("light", 30, LIGHT_LANES).id == light
    assert ledger.claim_job("light", 30, LIGHT_LANES) is None
    assert ledger.claim_job("full", 30).id == heavy


def test_higher_priority_delivery_is_sent_first(ledger):
    """Among due deliveries the instance's priority goes first."""
    low = ledger.record(received(0, action="forward", priority=0))
    high = ledger.record(received(1, action="forward", priority=9))
    [first] = ledger.claim_deliveries("f", 1, 60)
    [second] = ledger.claim_deliveries("f", 1, 60)
    assert (first.instance_id, second.instance_id) == (high, low)


def test_original_sent_early_does_not_finish_a_received_instance(ledger):
    """forward_original goes out at once; the instance is done only after its own output."""
    job_id = ledger.record(received(forward_original=("archive",)))
    [original] = ledger.claim_deliveries("f", 10, 60)
    assert (original.destination, original.payload, original.path) == (
        "archive",
        "original",
        "/spool/0.dcm",
    )
    ledger.mark_sent(original.id, 0)
    assert state_of(ledger, job_id) == "received"  # the method job still waits
    transform(ledger, job_id)
    [derived] = ledger.claim_deliveries("f", 10, 60)
    assert (derived.destination, derived.payload, derived.path) == (
        "cad",
        "derived",
        f"/out/{job_id}.dcm",
    )
    assert state_of(ledger, job_id) == "transformed"
    ledger.mark_sent(derived.id, 0)
    assert state_of(ledger, job_id) == "done"


def test_original_and_derived_are_retried_on_their_own(ledger, clock):
    """A failing original delivery does not hold back the derived one, nor the reverse."""
    job_id = ledger.record(received(forward_original=("archive",)))
    [original] = ledger.claim_deliveries("f", 10, 60)
    ledger.mark_delivery_failed(original.id, None, "archive down", retry_at=clock.t + 100)
    transform(ledger, job_id)
    [derived] = ledger.claim_deliveries("f", 10, 60)
    assert derived.destination == "cad"
    ledger.mark_sent(derived.id, 0)
    assert state_of(ledger, job_id) == "transformed"  # the original is still to be sent
    clock.t += 101
    [again] = ledger.claim_deliveries("f", 10, 60)
    assert again.id == original.id and again.attempts == 2
    ledger.mark_sent(again.id, 0)
    assert state_of(ledger, job_id) == "done"


def test_permanent_error_falls_back_to_the_original(ledger):
    """A permanent error with fallback destinations sends the original there and says why."""
    job_id = ledger.record(received(fallback_destinations=("cad", "pacs")))
    ledger.claim_job("w", 30)
    state = ledger.mark_job_error(
        job_id,
        "w",
        "NotEnoughReferences: no ML references",
        permanent=True,
        max_attempts=3,
        retry_in_s=5,
        seconds=0.25,
    )
    assert state == "transformed"
    [row] = ledger.queue()
    assert row["fallback_reason"] == "method.refused: NotEnoughReferences: no ML references"
    sends = ledger.claim_deliveries("f", 10, 60)
    assert {(d.destination, d.payload, d.path) for d in sends} == {
        ("cad", "original", "/spool/0.dcm"),
        ("pacs", "original", "/spool/0.dcm"),
    }
    for d in sends:
        ledger.mark_sent(d.id, 0)
    assert state_of(ledger, job_id) == "done"


def test_spent_attempts_fall_back_with_their_own_reason(ledger, clock):
    """A transient error that outlasts max_attempts falls back as method.failed."""
    job_id = ledger.record(received(fallback_destinations=("cad",)))
    for expected in ("received", "transformed"):
        ledger.claim_job("w", 30)
        state = ledger.mark_job_error(
            job_id, "w", "RuntimeError: OOM", permanent=False, max_attempts=2, retry_in_s=5
        )
        assert state == expected
        clock.t += 6
    assert ledger.queue()[0]["fallback_reason"] == "method.failed: RuntimeError: OOM"


def test_explicit_reason_is_recorded_as_given(ledger):
    """The caller's reason (a safety gate code and detail) is the fallback reason."""
    job_id = ledger.record(received(fallback_destinations=("cad",)))
    ledger.claim_job("w", 30)
    ledger.mark_job_error(
        job_id,
        "w",
        "SafetyGateError: safety.mask_overlap: 0.90 < 0.98",
        permanent=True,
        max_attempts=3,
        retry_in_s=5,
        reason="safety.mask_overlap: 0.90 < 0.98",
    )
    assert ledger.queue()[0]["fallback_reason"] == "safety.mask_overlap: 0.90 < 0.98"


def test_hold_keeps_the_job_failed_without_deliveries(ledger):
    """Without fallback destinations (on_failure = hold) a given-up job is failed."""
    job_id = ledger.record(received())
    ledger.claim_job("w", 30)
    assert (
        ledger.mark_job_error(job_id, "w", "bad", permanent=True, max_attempts=3, retry_in_s=5)
        == "failed"
    )
    [row] = ledger.queue()
    assert row["deliveries"] == [] and row["fallback_reason"] is None
    assert [(h["stage"], h["outcome"], h["reason"]) for h in ledger.history(job_id)] == [
        ("transform", "failed", "method.refused: bad")
    ]


def test_fallback_adds_no_second_copy_for_a_forward_original(ledger):
    """A fallback destination that already gets the original keeps its one delivery."""
    job_id = ledger.record(
        received(forward_original=("archive",), fallback_destinations=("cad", "archive"))
    )
    [early] = ledger.claim_deliveries("f", 10, 60)
    ledger.mark_sent(early.id, 0)
    ledger.claim_job("w", 30)
    ledger.mark_job_error(job_id, "w", "bad", permanent=True, max_attempts=3, retry_in_s=5)
    [row] = ledger.queue()
    assert sorted((d["destination"], d["state"]) for d in row["deliveries"]) == [
        ("archive", "sent"),
        ("cad", "pending"),
    ]
    [late] = ledger.claim_deliveries("f", 10, 60)
    ledger.mark_sent(late.id, 0)
    assert state_of(ledger, job_id) == "done"


def test_lost_lease_records_no_error(ledger, clock):
    """A worker that lost its lease cannot requeue, fail or fall back the job."""
    job_id = ledger.record(received(fallback_destinations=("cad",)))
    ledger.claim_job("w1", 30)
    clock.t += 31
    ledger.claim_job("w2", 30)
    assert (
        ledger.mark_job_error(job_id, "w1", "late", permanent=True, max_attempts=1, retry_in_s=0)
        == "processing"
    )
    assert ledger.history(job_id) == [] and ledger.queue()[0]["deliveries"] == []


def test_history_records_every_attempt_in_order(ledger, clock):
    """Processing, fallback and delivery attempts are kept in order with their details."""
    job_id = ledger.record(received(fallback_destinations=("pacs",)))
    ledger.claim_job("w", 30)
    ledger.mark_job_error(
        job_id, "w", "RuntimeError: OOM", permanent=False, max_attempts=3, retry_in_s=5, seconds=2
    )
    clock.t += 6
    ledger.claim_job("w", 30)
    ledger.mark_job_error(
        job_id, "w", "PixelError: bad", permanent=True, max_attempts=3, retry_in_s=5, seconds=1
    )
    [d] = ledger.claim_deliveries("f", 10, 60)
    clock.t += 1
    ledger.mark_delivery_failed(d.id, 0xA700, "out of resources", clock.t + 5, seconds=0.5)
    clock.t += 6
    [d] = ledger.claim_deliveries("f", 10, 60)
    ledger.mark_sent(d.id, 0, seconds=0.25)
    rows = ledger.history(job_id)
    reason = "method.refused: PixelError: bad"
    assert [(r["stage"], r["outcome"], r["reason"]) for r in rows] == [
        ("transform", "requeued", "RuntimeError: OOM"),
        ("transform", "fallback", reason),
        ("fallback", "forward-original", reason),
        ("deliver", "failed", "out of resources"),
        ("deliver", "sent", None),
    ]
    assert [r["destination"] for r in rows] == [None, None, "pacs", "pacs", "pacs"]
    assert [r["status"] for r in rows] == [None, None, None, 0xA700, 0]
    assert [r["seconds"] for r in rows] == [2, 1, None, 0.5, 0.25]
    assert [r["delivery_id"] for r in rows][2:] == [d.id] * 3
    assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)
    assert set(rows[0]) == {
        "id",
        "instance_id",
        "delivery_id",
        "at",
        "stage",
        "destination",
        "status",
        "outcome",
        "reason",
        "seconds",
    }


def test_v1_forwards_waiting_for_a_worker_move_to_the_forward_lane(tmp_path, clock):
    """Upgrading a v1 ledger hands its unprocessed forwards to the forwarder, not a worker."""
    from sqlalchemy import create_engine, insert

    from mr2nst.node.ledger.schema import MIGRATIONS, schema_version

    url = f"sqlite:///{tmp_path / 'v1.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        schema_version.create(conn)
        MIGRATIONS[0](conn)
        conn.execute(insert(schema_version).values(version=1, applied_at=0))
        for n, (action, state) in enumerate(
            [("forward", "received"), ("normalize", "received"), ("forward", "done")]
        ):
            conn.exec_driver_sql(
                "INSERT INTO instances (sop_class_uid, sop_instance_uid, study_uid, series_uid,"
                " transfer_syntax, calling_ae, called_ae, peer, route, action, destinations,"
                " state, attempts, spool_path, received_at, updated_at) VALUES"
                f" ('1.2', '1.2.{n}', '', '', '', '', '', '', 'r', '{action}', '[\"cad\"]',"
                f" '{state}', 0, '/spool/{n}.dcm', 0, 0)"
            )
    engine.dispose()
    ledger = Ledger.open(url, clock=clock)
    try:
        job = ledger.claim_job("w", 30)
        assert job is not None and job.action == "normalize"  # the forward is not a job
        [send] = ledger.claim_deliveries("f", 10, 60)
        assert (send.instance_id, send.payload, send.path) == (1, "original", "/spool/0.dcm")
        assert state_of(ledger, 1) == "transformed" and state_of(ledger, 3) == "done"
    finally:
        ledger.close()


def test_leases_of_dead_processes_on_this_host_end_at_start(ledger, clock):
    """A crashed predecessor's job and send are freed at once; live and foreign ones are not."""
    dead_job = ledger.record(received())
    live_job = ledger.record(received())
    other_host_job = ledger.record(received())
    ledger.claim_job("node-a:111:worker-0", 300)
    ledger.claim_job("node-a:222:worker-0", 300)
    ledger.claim_job("node-b:111:worker-0", 300)
    forward = ledger.record(received(dests=("cad",)))
    ledger.claim_job("node-a:222:worker-0", 300)
    ledger.mark_transformed(
        forward,
        "node-a:222:worker-0",
        output_path="x",
        out_series_uid=None,
        out_sop_uid=None,
        destinations=["cad"],
    )
    [send] = ledger.claim_deliveries("node-a:111:forwarder", 10, 300)

    freed = ledger.expire_dead_leases("node-a", alive=lambda pid: pid == 222)
    assert freed == 2
    assert ledger.claim_job("new", 1000).id == dead_job  # no wait for the 300 s lease
    assert ledger.claim_job("new", 30) is None  # live_job and other_host_job stay held
    assert [d.id for d in ledger.claim_deliveries("new", 10, 30)] == [send.id]
    clock.t += 301
    assert {ledger.claim_job("new", 30).id, ledger.claim_job("new", 30).id} == {
        live_job,
        other_host_job,
    }
