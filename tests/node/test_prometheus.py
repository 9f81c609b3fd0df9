"""Tests of the Prometheus metrics: endpoint, ledger-backed families, C-ECHO, dashboard, docs."""

import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest
from ledger_rows import attempt, delivery, instance
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import create_engine
from structlog.testing import capture_logs
from support import fresh_postgres, postgres_url

from mr2nst.node.config import parse_config
from mr2nst.node.ledger import InstanceState, Ledger, Received
from mr2nst.node.service import scp
from mr2nst.node.service.health import Health
from mr2nst.node.service.prometheus import LedgerCollector, Metrics
from mr2nst.node.service.routing import Router
from mr2nst.node.service.spool import Spool

ROOT = Path(__file__).resolve().parents[2]
NOW = 2000.0

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(
            postgres_url() is None, reason="no PostgreSQL server (run under pg_virtualenv)"
        ),
    ),
]


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=BACKENDS)
def ledger(request, tmp_path):
    """An empty ledger on SQLite, and on PostgreSQL where a server is available."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if request.param == "sqlite" else fresh_postgres()
    led = Ledger.open(url)
    yield led
    led.close()


def busy(ledger: Ledger) -> None:
    """A ledger with work in both lanes, a dead and a failing destination, transforms and
    fallbacks (the clock reads NOW = 2000)."""
    instance(ledger, state="received", received_at=1000)
    instance(ledger, state="processing", received_at=1500)
    queued = instance(ledger, state="transformed", received_at=1200)
    delivery(ledger, queued, "cad", state="pending")
    forward = instance(ledger, state="transformed", lane="forward", method=None, received_at=1800)
    d = delivery(ledger, forward, "archive", state="failed", error="connection refused")
    attempt(
        ledger,
        forward,
        stage="deliver",
        outcome="failed",
        at=1900,
        destination="archive",
        delivery_id=d,
        reason="connection refused",
    )
    done = instance(ledger, state="done", received_at=900)
    delivery(ledger, done, "cad", state="sent")
    dead = instance(ledger, state="transformed", received_at=1100)
    d = delivery(
        ledger, dead, "cad", state="dead", error="rejected", last_status=0xA900, updated_at=1950
    )
    attempt(
        ledger,
        dead,
        stage="deliver",
        outcome="dead",
        at=1950,
        destination="cad",
        delivery_id=d,
        status=0xA900,
        reason="0xA900 rejected",
    )
    attempt(ledger, done, stage="deliver", outcome="sent", at=1960, destination="cad", status=0)
    instance(ledger, state="unrouted", lane="none", method=None, received_at=100)
    for code in (
        "safety.spots: 2 of 5 spots lost",
        "safety.mask_overlap: 0.91 < 0.98",
        "method.refused: view ML",
    ):
        fell = instance(ledger, state="done", received_at=800, fallback_reason=code)
        delivery(ledger, fell, "cad", state="sent")
        attempt(ledger, fell, outcome="fallback", reason=code, seconds=0.2)
        attempt(ledger, fell, stage="fallback", outcome="forward-original", reason=code)
    held = instance(ledger, state="failed", method="spectral", received_at=800)  # hold
    attempt(ledger, held, outcome="failed", reason="safety.spots: 1 of 4 spots lost")
    for seconds in (0.3, 2.0, 7.0):
        attempt(ledger, done, seconds=seconds)
    attempt(ledger, dead, outcome="failed", reason="boom")  # no duration
    pt = instance(ledger, state="done", method="passthrough", received_at=700)
    attempt(ledger, pt, seconds=0.05)


def samples(registry: CollectorRegistry) -> dict:
    """Every sample of a registry as {(name, ((label, value), ...)): value}."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


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
        server.server_close()
        ledger.close()
    assert 'mr2nst_instances{state="received"} 1.0' in text
    assert 'mr2nst_deliveries{state="dead"} 0.0' in text
    assert 'mr2nst_cstore_total{status="0x0000"} 1.0' in text
    assert 'mr2nst_forward_total{destination="cad",outcome="dead"} 1.0' in text


def test_queue_depth_and_oldest_age_per_lane_and_destination(ledger):
    """Lanes and destinations report their unsettled jobs and the oldest one's age."""
    busy(ledger)
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger, destinations=["cad", "idle"], clock=lambda: NOW))
    got = samples(registry)
    assert got[("mr2nst_lane_depth", (("lane", "method"),))] == 3
    assert got[("mr2nst_lane_oldest_age_seconds", (("lane", "method"),))] == 1000
    assert got[("mr2nst_lane_depth", (("lane", "forward"),))] == 1
    assert got[("mr2nst_lane_oldest_age_seconds", (("lane", "forward"),))] == 200
    assert got[("mr2nst_destination_depth", (("destination", "cad"),))] == 1
    assert got[("mr2nst_destination_oldest_age_seconds", (("destination", "cad"),))] == 800
    assert got[("mr2nst_destination_depth", (("destination", "archive"),))] == 1
    assert got[("mr2nst_destination_depth", (("destination", "idle"),))] == 0
    assert got[("mr2nst_destination_oldest_age_seconds", (("destination", "idle"),))] == 0
    assert got[("mr2nst_destination_dead", (("destination", "cad"),))] == 1
    assert got[("mr2nst_ledger_up", ())] == 1


def test_transforms_by_method_and_outcome_with_durations(ledger):
    """Transform counts and the duration histogram come from every worker's attempt rows."""
    busy(ledger)
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger, clock=lambda: NOW))
    got = samples(registry)
    ok = (("method", "ehm"), ("outcome", "transformed"))
    assert got[("mr2nst_transforms_total", ok)] == 3
    assert got[("mr2nst_transforms_total", (("method", "ehm"), ("outcome", "failed")))] == 1
    assert (
        got[("mr2nst_transforms_total", (("method", "passthrough"), ("outcome", "transformed")))]
        == 1
    )

    def bucket(le: str) -> float:
        return got[("mr2nst_transform_seconds_bucket", (("le", le), *ok))]

    assert (bucket("0.1"), bucket("0.5"), bucket("2.5"), bucket("10.0"), bucket("+Inf")) == (
        0,
        1,
        2,
        3,
        3,
    )
    assert got[("mr2nst_transform_seconds_count", ok)] == 3
    assert got[("mr2nst_transform_seconds_sum", ok)] == pytest.approx(9.3)


def test_fallbacks_and_safety_failures_by_reason(ledger):
    """Fallbacks count every reason code; safety failures the gate's, fallen back or held."""
    busy(ledger)
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger, clock=lambda: NOW))
    got = samples(registry)
    fallbacks = {k[1][0][1]: v for k, v in got.items() if k[0] == "mr2nst_fallbacks_total"}
    safety = {k[1][0][1]: v for k, v in got.items() if k[0] == "mr2nst_safety_failures_total"}
    assert fallbacks == {"safety.spots": 1, "safety.mask_overlap": 1, "method.refused": 1}
    assert safety == {"safety.spots": 2, "safety.mask_overlap": 1}  # a held one counts too


def test_unreachable_ledger_scrapes_as_down(tmp_path):
    """A ledger that cannot be read gives mr2nst_ledger_up 0, not a failed scrape."""
    broken = Ledger(create_engine(f"sqlite:///{tmp_path / 'missing' / 'ledger.db'}"))
    registry = CollectorRegistry()
    registry.register(LedgerCollector(broken))
    got = samples(registry)
    assert got == {("mr2nst_ledger_up", ()): 0}


def test_c_echo_is_counted_and_logged_at_info(tmp_path):
    """A C-ECHO increments mr2nst_cecho_total and logs c_echo with the calling AE and peer."""
    cfg = parse_config(
        {"node": {"host": "127.0.0.1", "data_dir": str(tmp_path / "d"), "min_free_disk_mb": 0}},
        environ={},
    )
    spool = Spool(cfg.node.data_dir).create()
    ledger = Ledger.open(cfg.ledger_url)
    metrics = Metrics(ledger)
    service = scp.StoreService(
        spool, ledger, Router(cfg.routes), 0, scp.Allowlist.parse(()), metrics
    )
    server = scp.start_scp(cfg, service, port=0)
    try:
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(Verification)
        with capture_logs() as logs:
            assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="MR2NST")
            assert assoc.is_established
            status = assoc.send_c_echo()
            assoc.release()
    finally:
        server.shutdown()
        ledger.close()
    assert status.Status == 0
    assert samples(metrics.registry)[("mr2nst_cecho_total", ())] == 1
    [echo] = [e for e in logs if e["event"] == "c_echo"]
    assert echo["log_level"] == "info" and echo["calling_ae"] == "PROBE"
    assert echo["peer"] == "127.0.0.1"


def exported_names(tmp_path) -> set[str]:
    """Every sample name the node's registry can export (with ledger and health)."""
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'names.db'}")
    metrics = Metrics(ledger)
    metrics.add_health(
        Health(ledger, Spool(tmp_path), 0, lambda: 1, 1, weights=None), started_at=0.0
    )
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
    }
    names = {f.name + s for f in metrics.registry.collect() for s in suffixes[f.type]}
    ledger.close()
    return names


def test_grafana_dashboard_uses_only_exported_metrics(tmp_path):
    """deploy/grafana/mr2nst.json is valid JSON and every expr names exported metrics."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "mr2nst.json").read_text())
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            exprs.extend(v for k, v in node.items() if k == "expr" and isinstance(v, str))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dashboard)
    used = {name for e in exprs for name in re.findall(r"\bmr2nst_[a-z_]+", e)}
    assert len(exprs) >= 10 and used
    assert used <= exported_names(tmp_path), used - exported_names(tmp_path)


def test_operations_doc_lists_every_metric(tmp_path):
    """docs/operations.md names every metric family the node exports."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'doc.db'}")
    metrics = Metrics(ledger)
    metrics.add_health(
        Health(ledger, Spool(tmp_path), 0, lambda: 1, 1, weights=None), started_at=0.0
    )
    families = {
        f.name + ("_total" if f.type == "counter" else "") for f in metrics.registry.collect()
    }
    ledger.close()
    missing = {name for name in families if f"`{name}" not in doc}
    assert not missing, missing


@pytest.mark.parametrize("example", sorted((ROOT / "deploy" / "examples").glob("*.toml")))
def test_deploy_examples_turn_metrics_on_for_other_containers(example):
    """Every example config serves metrics on 0.0.0.0 (scrapable from another container)."""
    from mr2nst.node.config import load_config

    cfg = load_config(example)
    assert cfg.metrics.port == 9112 and cfg.metrics.host == "0.0.0.0"


def test_compose_and_helm_offer_the_metrics_port():
    """The compose file exposes 9112 and the Helm chart enables metrics on that port."""
    compose = (ROOT / "deploy" / "container" / "compose.yaml").read_text()
    assert re.search(r'expose:\n\s+- "9112"', compose)
    values = (ROOT / "deploy" / "helm" / "mr2nst" / "values.yaml").read_text()
    assert re.search(r"^metrics:\n  enabled: true\n  port: 9112$", values, re.MULTILINE)
    helpers = (ROOT / "deploy" / "helm" / "mr2nst" / "templates" / "_helpers.tpl").read_text()
    assert 'set $metrics "host" "0.0.0.0"' in helpers
