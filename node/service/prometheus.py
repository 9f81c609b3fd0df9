"""Prometheus metrics of the node (prometheus-client), served on ``metrics.port``.

What the ledger knows (queues, transforms, fallbacks) is read from it at scrape time, so
it is right whatever process (or node sharing a PostgreSQL ledger) recorded it: workers
are separate processes, and in-process counters could not see them. Counters and
histograms of the serving process cover what happens in it: C-STORE, C-ECHO and
deliveries. The same HTTP server answers ``/health`` (see :mod:`.health`). Every metric
is listed in docs/operations.md.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from mr2nst.node.ledger import Ledger, stats
from mr2nst.node.ledger.states import DeliveryState, InstanceState
from mr2nst.node.service.health import Health

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class LedgerCollector(Collector):
    """What the ledger knows, read on each scrape (see docs/operations.md, Metrics).

    Args:
        ledger: the ledger to read.
        destinations: destinations reported even while they have no work (0).
        clock: the time the ages are measured at.
    """

    def __init__(
        self,
        ledger: Ledger,
        destinations: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.destinations = tuple(destinations)
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        """The ledger's metric families; only ``mr2nst_ledger_up 0`` when it cannot be read."""
        up = GaugeMetricFamily("mr2nst_ledger_up", "Whether the last scrape could read the ledger")
        try:
            families = list(self._families())
        except SQLAlchemyError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        now = self.clock()
        counts = self.ledger.counts()
        with self.ledger.engine.connect() as conn:
            lanes = stats.lane_queues(conn)
            queues = stats.destination_queues(conn)
            dead = stats.dead_deliveries(conn)
            transforms = stats.transform_counts(conn)
            durations = stats.transform_durations(conn)
            fallbacks = stats.fallback_counts(conn)
            safety = stats.safety_failures(conn)
        yield from _state_families(counts)
        yield from _queue_families("lane", lanes, now)
        destinations = dict.fromkeys(self.destinations, stats.Queue()) | queues
        for name in dead:
            destinations.setdefault(name, stats.Queue())
        yield from _queue_families("destination", destinations, now)
        dead_family = GaugeMetricFamily(
            "mr2nst_destination_dead",
            "Deliveries given up (dead) per destination, waiting for `mr2nst queue retry`",
            labels=["destination"],
        )
        for name in destinations:
            dead_family.add_metric([name], dead.get(name, 0))
        yield dead_family
        yield from _transform_families(transforms, durations)
        yield _by_reason(
            "mr2nst_fallbacks",
            "Instances sent on as the original instead of a method's output, by reason code",
            fallbacks,
        )
        yield _by_reason(
            "mr2nst_safety_failures",
            "Outputs stopped by the safety gate, by failed check (all worker processes)",
            safety,
        )


def _state_families(counts: dict[str, int]) -> Iterator[Metric]:
    """``mr2nst_instances`` and ``mr2nst_deliveries``: rows per state (0 when none)."""
    instances = GaugeMetricFamily(
        "mr2nst_instances", "Instances in the ledger by state", labels=["state"]
    )
    for instance_state in InstanceState:
        instances.add_metric([instance_state], counts.get(instance_state, 0))
    deliveries = GaugeMetricFamily(
        "mr2nst_deliveries", "Deliveries in the ledger by state", labels=["state"]
    )
    for delivery_state in DeliveryState:
        deliveries.add_metric([delivery_state], counts.get(f"delivery_{delivery_state}", 0))
    yield instances
    yield deliveries


def _queue_families(kind: str, queues: dict[str, stats.Queue], now: float) -> Iterator[Metric]:
    """Depth and age of the oldest job per lane or destination."""
    what = "lane" if kind == "lane" else "destination's deliveries"
    depth = GaugeMetricFamily(
        f"mr2nst_{kind}_depth", f"Jobs waiting or in progress, per {what}", labels=[kind]
    )
    age = GaugeMetricFamily(
        f"mr2nst_{kind}_oldest_age_seconds",
        f"Seconds since the oldest job still queued per {what} was received (0 when empty)",
        labels=[kind],
    )
    for name, queue in sorted(queues.items()):
        depth.add_metric([name], queue.depth)
        age.add_metric([name], queue.oldest_age_s(now))
    yield depth
    yield age


def _transform_families(
    transforms: dict[tuple[str, str], int], durations: dict[tuple[str, str], stats.Durations]
) -> Iterator[Metric]:
    """Processing attempts by method and outcome, and their durations."""
    counter = CounterMetricFamily(
        "mr2nst_transforms",
        "Processing attempts by method and outcome (all worker processes)",
        labels=["method", "outcome"],
    )
    for (method, outcome), n in sorted(transforms.items()):
        counter.add_metric([method, outcome], n)
    yield counter
    histogram = HistogramMetricFamily(
        "mr2nst_transform_seconds",
        "Duration of processing attempts by method and outcome (all worker processes)",
        labels=["method", "outcome"],
    )
    for (method, outcome), d in sorted(durations.items()):
        buckets = [(_le(bound), float(n)) for bound, n in d.buckets] + [("+Inf", float(d.count))]
        histogram.add_metric([method, outcome], buckets, d.total_s)
    yield histogram


def _le(bound: float) -> str:
    """A bucket bound as prometheus-client writes it (``1.0``, ``2.5``)."""
    return repr(float(bound))


def _by_reason(name: str, documentation: str, counts: dict[str, int]) -> Metric:
    """A counter family with one sample per reason code."""
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, n in sorted(counts.items()):
        family.add_metric([reason], n)
    return family


class HealthCollector(Collector):
    """The ``/health`` checks and the node's process facts as gauges.

    Args:
        health: the node's health checks.
        started_at: when the node started (seconds since the epoch).
    """

    def __init__(self, health: Health, started_at: float) -> None:
        self.health = health
        self.started_at = started_at

    def collect(self) -> Iterator[Metric]:
        """``mr2nst_health``, worker counts, free disk and the start time."""
        checks = GaugeMetricFamily(
            "mr2nst_health", "Health checks of /health: 1 passes, 0 fails", labels=["check"]
        )
        for check in self.health.checks():
            checks.add_metric([check.name], 1 if check.ok else 0)
        yield checks
        yield GaugeMetricFamily(
            "mr2nst_workers_alive", "Worker processes alive", value=self.health.workers_alive()
        )
        yield GaugeMetricFamily(
            "mr2nst_workers_configured",
            "Worker processes configured (workers.count + workers.light)",
            value=self.health.workers_configured,
        )
        try:
            free = self.health.spool.free_mb() * 1024 * 1024
        except OSError:
            free = float("nan")
        yield GaugeMetricFamily(
            "mr2nst_disk_free_bytes", "Free space on the file system of data_dir", value=free
        )
        yield GaugeMetricFamily(
            "mr2nst_disk_min_free_bytes",
            "node.min_free_disk_mb: below this, C-STORE is refused with 0xA700",
            value=self.health.min_free_mb * 1024 * 1024,
        )
        yield GaugeMetricFamily(
            "mr2nst_start_time_seconds",
            "When the node started, seconds since the epoch",
            value=self.started_at,
        )


class Metrics:
    """The node's metrics; one per serving process, passed to the SCP and forwarder.

    Args:
        ledger: when given, what the ledger knows is read from it at each scrape.
        destinations: the configured destinations (reported with 0 while idle).
    """

    def __init__(self, ledger: Ledger | None = None, destinations: Sequence[str] = ()) -> None:
        self.registry = CollectorRegistry()
        self.health: Health | None = None
        self.stores = Counter(
            "mr2nst_cstore",
            "C-STORE requests handled, by returned status",
            ["status"],
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "mr2nst_cstore_seconds",
            "Time to persist and record one C-STORE",
            registry=self.registry,
        )
        self.echoes = Counter("mr2nst_cecho", "C-ECHO requests answered", registry=self.registry)
        self.sends = Counter(
            "mr2nst_forward",
            "Delivery attempts, by destination and outcome",
            ["destination", "outcome"],
            registry=self.registry,
        )
        self.send_seconds = Histogram(
            "mr2nst_forward_seconds",
            "Time of one delivery attempt",
            ["destination"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self._ledger_collector: LedgerCollector | None = None
        if ledger is not None:
            self._ledger_collector = LedgerCollector(ledger, destinations)
            self.registry.register(self._ledger_collector)

    def set_destinations(self, destinations: Sequence[str]) -> None:
        """Report these destinations (with 0 while idle) from now on (a config reload)."""
        if self._ledger_collector is not None:
            self._ledger_collector.destinations = tuple(destinations)

    def add_health(self, health: Health, started_at: float) -> None:
        """Answer ``/health`` with ``health`` and export its checks as gauges."""
        self.health = health
        self.registry.register(HealthCollector(health, started_at))

    def app(self) -> WSGIApp:
        """The WSGI app: ``/metrics`` (Prometheus text), ``/health`` (JSON; 200 or 503) and
        404 on every other path (``/``, ``/metrics/x``, ``/favicon.ico``, ...)."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            if path != "/health":
                return _not_found(start_response)
            if self.health is None:
                code, body = 404, {"status": "unknown", "reason": "no health checks here"}
            else:
                code, body = self.health.report()
            data = json.dumps(body).encode()
            start_response(
                f"{code} {_REASONS.get(code, '')}",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(data))),
                    ("Cache-Control", "no-store"),
                ],
            )
            return [data]

        return app

    def serve(self, host: str, port: int) -> WSGIServer:
        """Start the HTTP endpoint (``/metrics`` and ``/health``) in a daemon thread.

        Returns:
            The server (``server_address`` has the port); ``shutdown()`` stops it.
        """
        family, addr = _best_family(host, port)

        class Server(ThreadingWSGIServer):
            address_family = family

        server = make_server(addr, port, self.app(), Server, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="mr2nst-metrics", daemon=True).start()
        return server


_REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


def _not_found(start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A plain 404: only ``/metrics`` and ``/health`` are served."""
    data = b"not found: this endpoint serves only /metrics and /health\n"
    start_response(
        "404 Not Found",
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [data]


class _QuietHandler(WSGIRequestHandler):
    """No access log line on stderr per scrape."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        """Drop the access log line."""


def _best_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family and address to bind ``host`` with (IPv6 hosts work too)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])
