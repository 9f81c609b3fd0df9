"""The forwarder: delivers instances to their destinations, with retries.

A delivery sends either a method's output (``derived``) or the received file unchanged
(``original``: a forward route, a route's ``forward_original``, or a fallback). Forwards
come straight from the SCP, so they never wait behind the workers.

An APScheduler interval job polls the ledger for due deliveries and hands each to a
thread pool. A failed attempt is rescheduled in the ledger with exponential backoff and
jitter; after ``forwarding.max_attempts`` or a permanent rejection it becomes ``dead``
until ``mr2nst queue retry``. A second job purges settled files after their retention.
Backoff and retention read the injectable ``clock`` (epoch seconds, like the ledger's), so
tests can let time pass without sleeping.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from mr2nst.node.config import Config
from mr2nst.node.ledger import Clock, DeliveryJob, Ledger
from mr2nst.node.logs import get_logger, instance_context
from mr2nst.node.service.destinations import Destination, SendResult
from mr2nst.node.service.prometheus import Metrics
from mr2nst.node.service.spool import Spool

log = get_logger("mr2nst.forwarder")


def _lease_s(config: Config) -> float:
    """A delivery's lease: long enough for the slowest destination's send (its own
    timeout, if longer than the node's)."""
    slowest = max(
        [config.node.network_timeout_s]
        + [d.timeout_s + d.connect_timeout_s for d in config.destinations.values()]
    )
    return max(60.0, 3 * slowest)


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter.

    Uniform in [d/2, d], d = min(max, initial * 2^(attempt-1)).
    """
    delay = min(max_s, initial_s * 2 ** max(0, attempt - 1))
    return rng.uniform(delay / 2, delay)


class Forwarder:
    """Owns the scheduler, the send pool and the cleanup job.

    Args:
        config: The node's configuration (``forwarding`` and ``node.retention_hours``).
        ledger: Where deliveries are claimed and their outcomes recorded.
        spool: The data directory whose settled files ``cleanup`` removes.
        destinations: Destination name -> sender.
        rng: The jitter source for backoff (seed it for reproducible delays).
        metrics: Prometheus counters and histograms, if exported.
        clock: Wall-clock time for retry scheduling and retention; pass the ledger's clock.
    """

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        spool: Spool,
        destinations: Mapping[str, Destination],
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics
        self.ledger = ledger
        self.spool = spool
        self.destinations = destinations
        self.rng = rng or random.Random()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:forwarder"
        self.lease_s = _lease_s(config)
        self._pool = ThreadPoolExecutor(
            config.forwarding.concurrency, thread_name_prefix="mr2nst-send"
        )
        self._inflight: set[int] = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._scheduler = BackgroundScheduler(timezone="UTC")

    def set_destinations(self, destinations: Mapping[str, Destination], config: Config) -> None:
        """Send with ``destinations`` from now on (a config reload of ``config``).

        Sends in flight finish with the destination they started with; a delivery whose
        destination is gone fails permanently, as at start.
        """
        self.lease_s = _lease_s(config)
        self.destinations = destinations

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` has been called: nothing more is claimed or started."""
        return self._stopping

    def start(self) -> None:
        """Start the dispatch job (every ``forwarding.poll_s``) and the cleanup job."""
        fwd = self.config.forwarding
        self._scheduler.add_job(
            self.dispatch,
            "interval",
            seconds=fwd.poll_s,
            id="dispatch",
            max_instances=1,
            coalesce=True,
        )
        retention_s = self.config.node.retention_hours * 3600
        self._scheduler.add_job(
            self.cleanup,
            "interval",
            seconds=max(10.0, min(600.0, retention_s / 10 or 10)),
            id="cleanup",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.start()

    def stop(self) -> None:
        """Stop polling and let in-flight sends finish (each is bounded by the network timeout).

        Deliveries claimed but not yet started are handed back without using an attempt.
        """
        self._stopping = True
        self._scheduler.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    def dispatch(self) -> int:
        """Claim due deliveries up to the free send slots and submit them; returns the count."""
        with self._lock:
            free = self.config.forwarding.concurrency - len(self._inflight)
            if free <= 0 or self._stopping:
                return 0
            try:
                jobs = self.ledger.claim_deliveries(
                    self.owner, free, self.lease_s, exclude=self._inflight
                )
            except Exception as exc:  # edge: scheduler job; the ledger may be briefly unavailable
                log.error("dispatch_failed", error=f"{exc.__class__.__name__}: {exc}")
                return 0
            for job in jobs:
                self._inflight.add(job.id)
                self._pool.submit(self.handle, job)
            return len(jobs)

    def handle(self, job: DeliveryJob) -> None:
        """Deliver one claimed job as a send thread does; never raises.

        Runs within the job's log context. A job not yet started when the forwarder stops
        is handed back without using an attempt; an unexpected error counts as a failed
        attempt; a failure of the ledger itself is logged and the lease brings the job back.
        """
        try:
            with instance_context(
                job_id=job.instance_id,
                study_uid=job.study_uid,
                series_uid=job.series_uid,
                sop_uid=job.sop_instance_uid,
                route=job.route,
            ):
                if self._stopping:
                    self.ledger.release_delivery(job.id)
                    return
                try:
                    self.deliver(job)
                except Exception as exc:  # edge: an unexpected error counts as a failed attempt
                    self._record_failure(
                        job,
                        SendResult(False, None, False, f"{exc.__class__.__name__}: {exc}"),
                        {
                            "destination": job.destination,
                            "payload": job.payload,
                            "attempt": job.attempts,
                        },
                    )
        except Exception as exc:  # edge: the ledger failed; the lease brings the delivery back
            log.error(
                "stage_forward",
                outcome="error",
                delivery_id=job.id,
                error=f"{exc.__class__.__name__}: {exc}",
            )
        finally:
            with self._lock:
                self._inflight.discard(job.id)

    def deliver(self, job: DeliveryJob) -> SendResult:
        """Send one delivery and record the outcome in the ledger."""
        started = time.perf_counter()
        dest = self.destinations.get(job.destination)
        if dest is None:
            result = SendResult(
                False, None, True, f"destination {job.destination!r} is no longer configured"
            )
        else:
            result = dest.send(job.path)
        if self.metrics is not None:
            self.metrics.send_seconds.labels(destination=job.destination).observe(
                time.perf_counter() - started
            )
        seconds = time.perf_counter() - started
        fields = {
            "destination": job.destination,
            "payload": job.payload,
            "attempt": job.attempts,
            "status": None if result.status is None else f"0x{result.status:04X}",
            "duration_ms": round(seconds * 1000, 1),
        }
        if result.ok:
            self.ledger.mark_sent(job.id, result.status or 0, seconds=seconds)
            if self.metrics is not None:
                self.metrics.sends.labels(destination=job.destination, outcome="sent").inc()
            log.info("stage_forward", outcome="sent", **fields)
            return result
        self._record_failure(job, result, fields, seconds)
        return result

    def _record_failure(
        self,
        job: DeliveryJob,
        result: SendResult,
        fields: dict[str, object],
        seconds: float | None = None,
    ) -> None:
        fwd = self.config.forwarding
        retry_at = None
        if not result.permanent and job.attempts < fwd.max_attempts:
            retry_at = self.clock() + backoff_delay(
                job.attempts, fwd.backoff_initial_s, fwd.backoff_max_s, self.rng
            )
        state = self.ledger.mark_delivery_failed(
            job.id, result.status, result.error, retry_at, seconds=seconds
        )
        if self.metrics is not None:
            self.metrics.sends.labels(destination=job.destination, outcome=state).inc()
        log.warning(
            "stage_forward",
            outcome=state,
            error=result.error,
            permanent=result.permanent,
            retry_in_s=None if retry_at is None else round(retry_at - self.clock(), 1),
            **fields,
        )

    def cleanup(self) -> int:
        """Remove spool and outbox files of settled instances older than the retention."""
        cutoff = self.clock() - self.config.node.retention_hours * 3600
        try:
            rows = self.ledger.settled_files(cutoff)
        except Exception as exc:  # edge: scheduler job
            log.error("cleanup_failed", error=f"{exc.__class__.__name__}: {exc}")
            return 0
        removed = remove_files(rows, self.spool)
        self.ledger.forget_paths([r["id"] for r in rows])
        if rows:
            log.info("cleanup", instances=len(rows), files_removed=removed)
        return removed


def remove_files(rows: list[dict[str, object]], spool: Spool) -> int:
    """Unlink the spool/outbox/dead files named by ledger rows (only inside data_dir)."""
    removed = 0
    for row in rows:
        for key in ("spool_path", "output_path"):
            value = row.get(key)
            if not value:
                continue
            path = Path(str(value)).resolve()
            if spool.root in path.parents and path.exists():
                path.unlink()
                removed += 1
    return removed
