"""Engine workers: separate processes that claim jobs of the method lane and transform them.

Each worker builds its methods once (an engine loads its weights once per process),
then loops: claim ``received`` -> ``processing`` (highest route priority first) under a
lease it renews from a heartbeat thread, run the pipeline, write the derived file (fsync +
rename) to ``outbox/`` and mark the job ``transformed`` with one pending delivery per
destination. A job that cannot be normalized (a permanent error, a failed safety gate, or
its attempts spent) falls back to sending the original to the route's fallback
destinations, or is held ``failed``. Forwards never reach a worker. A worker exits when
asked to stop (after its current job) or when its parent process has died.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import TYPE_CHECKING

from mr2nst.bank.errors import BankError
from mr2nst.core.errors import ImageError
from mr2nst.node.config import Config
from mr2nst.node.errors import PixelError, SafetyGateError
from mr2nst.node.ledger import LIGHT_LANES, WORKER_LANES, Job, Ledger
from mr2nst.node.ledger.states import InstanceState
from mr2nst.node.logs import configure_logging, get_logger, instance_context
from mr2nst.node.methods.registry import MethodCache
from mr2nst.node.service.pipeline import Pipeline
from mr2nst.node.service.spool import Spool

if TYPE_CHECKING:
    from mr2nst.core.engine import Progress

log = get_logger("mr2nst.worker")

IDLE_POLL_S = 0.5
# Failures that retrying cannot fix: bad pixels, an image the method cannot use, a bank
# without suitable references, an output that failed the safety gate. The job is given up
# at once (fallback or failed); `mr2nst queue retry` revives a failed one.
PERMANENT_ERRORS = (PixelError, ImageError, BankError, SafetyGateError)

# The outcome of a processing attempt, by the state it left the job in.
_OUTCOMES = {
    InstanceState.RECEIVED: "requeued",
    InstanceState.FAILED: "failed",
    InstanceState.TRANSFORMED: "fallback",
    InstanceState.DONE: "fallback",
    InstanceState.PROCESSING: "lease_lost",
}


def give_up_reason(exc: Exception, error: str, permanent: bool) -> str:
    """Why a job given up after ``exc`` was not normalized, as ``"<code>: <detail>"``.

    The safety gate's own code (``safety.…``), ``method.refused`` for another permanent
    error, ``method.failed`` when the attempts are spent.
    """
    if isinstance(exc, SafetyGateError):
        return f"{exc.code}: {exc.detail}"
    return f"method.{'refused' if permanent else 'failed'}: {error}"


def _log_progress(progress: Progress) -> None:
    """Engine progress -> one log line per finished batch of tiles."""
    if progress.iteration == progress.iterations:
        log.info(
            "transfer_progress",
            scale=progress.scale,
            grid=progress.grid,
            batch=progress.batch + 1,
            batches=progress.n_batches,
            tiles_done=progress.tiles_done,
            tiles_total=progress.tiles_total,
            loss=round(progress.loss, 6),
        )


class _Heartbeat(threading.Thread):
    """Renews a job's lease every third of the lease until stopped."""

    def __init__(self, ledger: Ledger, job_id: int, owner: str, lease_s: float) -> None:
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self._args = (ledger, job_id, owner, lease_s)
        self.stopped = threading.Event()

    def run(self) -> None:
        """Renew until :attr:`stopped` is set."""
        ledger, job_id, owner, lease_s = self._args
        while not self.stopped.wait(lease_s / 3):
            try:
                ledger.renew_lease(job_id, owner, lease_s)
            except Exception as exc:  # edge: keep working; the lease may lapse, the job be redone
                log.warning("lease_renew_failed", job_id=job_id, error=str(exc))


class Worker:
    """The claim-process-record loop of one worker process.

    Args:
        config: the node's configuration.
        ledger: where jobs are claimed and results recorded.
        spool: where derived files are written and failed sources buried.
        name: this worker's name, part of its lease owner id.
        lanes: the lanes it claims from (a light worker: only ``light``).
    """

    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        spool: Spool,
        name: str,
        lanes: Sequence[str] = WORKER_LANES,
    ) -> None:
        self.lanes = tuple(lanes)
        self.config = config
        self.ledger = ledger
        self.spool = spool
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{name}"
        self.pipeline = Pipeline(config, MethodCache(config, progress=_log_progress))

    def run_once(self) -> bool:
        """Claim and process one job; False when there was none."""
        job = self.ledger.claim_job(self.owner, self.config.workers.lease_s, self.lanes)
        if job is None:
            return False
        with instance_context(
            job_id=job.id,
            study_uid=job.study_uid,
            series_uid=job.series_uid,
            sop_uid=job.sop_instance_uid,
            calling_ae=job.calling_ae,
            route=job.route,
        ):
            self._process(job)
        return True

    def _process(self, job: Job) -> None:
        """Run the pipeline on a claimed job under a renewed lease and record the outcome."""
        started = time.perf_counter()
        beat = _Heartbeat(self.ledger, job.id, self.owner, self.config.workers.lease_s)
        beat.start()
        try:
            out = self.pipeline.run(job, self.spool)
        except Exception as exc:  # edge: every failure becomes a ledger state and a log event
            self._record_error(job, exc, time.perf_counter() - started)
            return
        finally:
            beat.stopped.set()
        seconds = time.perf_counter() - started
        recorded = self.ledger.mark_transformed(
            job.id,
            self.owner,
            output_path=out.path,
            out_series_uid=out.series_uid,
            out_sop_uid=out.sop_uid,
            destinations=job.destinations,
            seconds=seconds,
        )
        log.info(
            "stage_transform",
            outcome="transformed" if recorded else "lease_lost",
            action=job.action,
            method=job.method,
            attempt=job.attempts,
            out_sop_uid=out.sop_uid,
            duration_ms=round(seconds * 1000, 1),
        )

    def _record_error(self, job: Job, exc: Exception, seconds: float) -> None:
        """Requeue the job, fall back to the original, or hold it failed; log the outcome."""
        error = f"{exc.__class__.__name__}: {exc}"
        permanent = isinstance(exc, PERMANENT_ERRORS)
        reason = give_up_reason(exc, error, permanent)
        state = self.ledger.mark_job_error(
            job.id,
            self.owner,
            error,
            permanent=permanent,
            max_attempts=self.config.workers.max_attempts,
            retry_in_s=min(300.0, 5.0 * 2 ** (job.attempts - 1)),
            reason=reason,
            seconds=seconds,
        )
        outcome = _OUTCOMES.get(state, str(state))
        fields: dict[str, object] = {}
        if state == InstanceState.FAILED and job.spool_path and Path(job.spool_path).exists():
            # Held: the source waits in dead/ for `queue retry` or `queue purge`.
            self.ledger.set_paths(job.id, spool_path=str(self.spool.bury(Path(job.spool_path))))
        if outcome == "fallback":
            fields["fallback_destinations"] = list(job.fallback_destinations)
        if outcome in ("failed", "fallback"):
            fields["reason"] = reason
        emit = log.error if outcome == "failed" else log.warning
        emit(
            "stage_transform",
            outcome=outcome,
            attempt=job.attempts,
            method=job.method,
            error=error,
            duration_ms=round(seconds * 1000, 1),
            **fields,
        )

    def loop(self, stop: EventType, parent_pid: int) -> None:
        """Process jobs until ``stop`` is set or the parent process ``parent_pid`` is gone."""
        while not stop.is_set() and os.getppid() == parent_pid:
            try:
                busy = self.run_once()
            except Exception as exc:  # edge: e.g. the ledger is unreachable; back off and retry
                log.error("worker_error", error=f"{exc.__class__.__name__}: {exc}")
                busy = False
                stop.wait(5.0)
            if not busy:
                stop.wait(IDLE_POLL_S)


def pin_gpu(config: Config, index: int) -> Config:
    """Worker ``index`` gets GPU ``index mod count``.

    Only when the device is auto/cuda and there are several GPUs.
    """
    if config.engine.device not in ("auto", "cuda"):
        return config
    import torch

    count = torch.cuda.device_count()
    if count <= 1:
        return config
    engine = config.engine.model_copy(update={"device": f"cuda:{index % count}"})
    return config.model_copy(update={"engine": engine})


def share_cpu_threads(workers: int) -> int:
    """Give each worker process its share of the cores (torch would take them all in each
    process, and oversubscribed VGG passes run many times slower). Returns the thread count."""
    import torch

    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    return threads


def worker_main(
    config: Config,
    name: str,
    stop: EventType,
    parent_pid: int,
    index: int = 0,
    lanes: Sequence[str] = WORKER_LANES,
) -> None:
    """Entry point of a worker process.

    Workers ignore SIGINT, SIGTERM and SIGHUP: a Ctrl-C or a signal to the whole process
    group reaches the node, which stops its workers through ``stop`` after their current
    job (and reloads routes and destinations itself on SIGHUP).
    (A worker killed inside the shared Event's lock would hang the node's stop.)
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(config.logging.format, config.logging.level)
    config = pin_gpu(config, index)
    share_cpu_threads(config.workers.count)
    ledger = Ledger.open(config.ledger_url)
    worker = Worker(config, ledger, Spool(config.node.data_dir), name, lanes)
    log.info("worker_started", worker=worker.owner, lanes=list(lanes), device=config.engine.device)
    try:
        worker.loop(stop, parent_pid)
    finally:
        ledger.close()
        log.info("worker_stopped", worker=worker.owner)


class WorkerPool:
    """Starts and stops the worker processes (spawned, so CUDA can be used in each)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()
        self._procs: list[mp.process.BaseProcess] = []

    def _spawn(self, index: int) -> mp.process.BaseProcess:
        """Worker ``index``: the first ``workers.count`` serve every lane, the rest ``light``."""
        light = index >= self.config.workers.count
        proc = self._ctx.Process(
            target=worker_main,
            name=f"mr2nst-{'light-' if light else ''}worker-{index}",
            args=(
                self.config,
                f"{'l' if light else 'w'}{index}",
                self._stop,
                os.getpid(),
                index,
                LIGHT_LANES if light else WORKER_LANES,
            ),
        )
        proc.start()
        return proc

    def start(self) -> None:
        """Spawn ``workers.count`` workers for every lane and ``workers.light`` light ones."""
        self._procs = [self._spawn(i) for i in range(self.config.workers.total)]

    def restart_dead(self) -> None:
        """Replace worker processes that died (their jobs come back when the lease ends)."""
        for index, proc in enumerate(self._procs):
            if not proc.is_alive() and not self._stop.is_set():
                self._procs[index] = self._spawn(index)

    def alive(self) -> int:
        """How many worker processes are running."""
        return sum(p.is_alive() for p in self._procs)

    def stop(self, timeout: float) -> None:
        """Ask workers to finish their current job and exit; terminate after ``timeout``."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("worker_killed", worker=proc.name, reason="did not stop in time")
                proc.kill()  # its job's lease expires and the job is redone
                proc.join(5)
