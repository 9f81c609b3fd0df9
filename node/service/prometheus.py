"""Prometheus metrics of the node (prometheus-client), served on ``metrics.port``.

Queue depths come from the ledger at scrape time, so they are right whatever process
(or node sharing a PostgreSQL ledger) changed them. Counters and histograms are kept by
the serving process for what happens in it: C-STORE outcomes and deliveries.
"""

from __future__ import annotations

from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mr2nst.node.ledger import Ledger
from mr2nst.node.ledger.states import DeliveryState, InstanceState


class LedgerCollector(Collector):
    """Instances and deliveries per state, read from the ledger on each scrape.

    Args:
        ledger: the ledger to count in.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One gauge family per table, with a sample for every state (0 when none)."""
        counts = self.ledger.counts()
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


class Metrics:
    """The node's metrics; one per serving process, passed to the SCP and forwarder.

    Args:
        ledger: when given, queue depths are read from it at each scrape.
    """

    def __init__(self, ledger: Ledger | None = None) -> None:
        self.registry = CollectorRegistry()
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
        if ledger is not None:
            self.registry.register(LedgerCollector(ledger))

    def serve(self, host: str, port: int) -> WSGIServer:
        """Start the HTTP endpoint (``/metrics``) in a daemon thread.

        Returns:
            The server; ``shutdown()`` stops it.
        """
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
