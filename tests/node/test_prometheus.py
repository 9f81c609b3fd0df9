"""Tests of the Prometheus metrics endpoint."""

import socket
import urllib.request

from mr2nst.node.config import parse_config
from mr2nst.node.ledger import InstanceState, Ledger, Received
from mr2nst.node.service.prometheus import Metrics


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_reports_ledger_states_and_counters(tmp_path):
    """/metrics shows queue depths from the ledger and the process's counters."""
    cfg = parse_config({"node": {"data_dir": str(tmp_path)}}, environ={})
    ledger = Ledger.open(cfg.ledger_url)
    ledger.record(
        Received(
            "1.2",
            "1.2.3",
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
            InstanceState.RECEIVED,
            "/x",
        )
    )
    metrics = Metrics(ledger)
    metrics.stores.labels(status="0x0000").inc()
    metrics.sends.labels(destination="cad", outcome="dead").inc()
    port = free_port()
    server = metrics.serve("127.0.0.1", port)
    try:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )
    finally:
        server.shutdown()
        ledger.close()
    assert 'mr2nst_instances{state="received"} 1.0' in text
    assert 'mr2nst_deliveries{state="dead"} 0.0' in text
    assert 'mr2nst_cstore_total{status="0x0000"} 1.0' in text
    assert 'mr2nst_forward_total{destination="cad",outcome="dead"} 1.0' in text
