"""Tests of /health on the metrics server: each check, the JSON body, the HTTP status."""

import json
import urllib.error
import urllib.request

import pytest
from sqlalchemy import create_engine

from mr2nst.node.ledger import Ledger
from mr2nst.node.service.health import Health
from mr2nst.node.service.prometheus import Metrics
from mr2nst.node.service.spool import Spool


def get(port: int, path: str) -> tuple[int, str]:
    """GET a path of the local server: (HTTP status, body), 5xx included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def serve(tmp_path):
    """Serves /health and /metrics on an ephemeral port for given health settings."""
    servers = []
    ledger = Ledger.open(f"sqlite:///{tmp_path / 'ledger.db'}")

    def start(alive=1, configured=1, min_free_mb=0.0, weights=None, led=None):
        health = Health(
            led or ledger, Spool(tmp_path), min_free_mb, lambda: alive, configured, weights
        )
        metrics = Metrics(ledger)
        metrics.add_health(health, started_at=0.0)
        server = metrics.serve("127.0.0.1", 0)
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
    ledger.close()


def test_all_checks_pass_gives_200(serve):
    """A healthy node answers 200 with every check passing, on the metrics port."""
    port = serve(weights=True)
    code, body = get(port, "/health")
    report = json.loads(body)
    assert code == 200 and report["status"] == "ok"
    assert set(report["checks"]) == {"ledger", "disk", "workers", "weights"}
    assert all(c["ok"] for c in report["checks"].values())
    assert report["checks"]["weights"]["detail"] == "verified at start"
    assert report["checks"]["workers"]["detail"] == "1 of 1 alive"


def test_dead_worker_gives_503(serve):
    """Fewer workers alive than workers.count fails the workers check."""
    port = serve(alive=1, configured=2)
    code, body = get(port, "/health")
    report = json.loads(body)
    assert code == 503 and report["status"] == "fail"
    assert report["checks"]["workers"] == {"ok": False, "detail": "1 of 2 alive"}
    assert report["checks"]["ledger"]["ok"] and report["checks"]["disk"]["ok"]


def test_disk_below_watermark_gives_503(serve):
    """Free disk below node.min_free_disk_mb fails the disk check."""
    port = serve(min_free_mb=1e12)
    code, body = get(port, "/health")
    assert code == 503 and json.loads(body)["checks"]["disk"]["ok"] is False


def test_unreachable_ledger_gives_503(serve, tmp_path):
    """A ledger that cannot be read fails the ledger check (the server still answers)."""
    broken = Ledger(create_engine(f"sqlite:///{tmp_path / 'missing' / 'ledger.db'}"))
    port = serve(led=broken)
    code, body = get(port, "/health")
    check = json.loads(body)["checks"]["ledger"]
    assert code == 503 and check["ok"] is False and check["detail"].startswith("unreachable")


def test_weights_not_verified_gives_503_and_not_needed_passes(serve):
    """Weights fail only when an mr2nst route needs them and they were not verified."""
    code, body = get(serve(weights=False), "/health")
    assert code == 503 and json.loads(body)["checks"]["weights"]["ok"] is False
    code, body = get(serve(weights=None), "/health")
    assert code == 200 and "not needed" in json.loads(body)["checks"]["weights"]["detail"]


def test_metrics_on_the_same_server_export_the_checks(serve):
    """/metrics keeps working beside /health and exports each check as mr2nst_health."""
    port = serve(alive=0, configured=1)
    code, text = get(port, "/metrics")
    assert code == 200
    assert 'mr2nst_health{check="workers"} 0.0' in text
    assert 'mr2nst_health{check="ledger"} 1.0' in text
    assert "mr2nst_workers_configured 1.0" in text


def test_health_without_checks_is_404(tmp_path):
    """A metrics server without health checks does not pretend to be healthy."""
    server = Metrics().serve("127.0.0.1", 0)
    try:
        code, body = get(server.server_address[1], "/health")
    finally:
        server.shutdown()
        server.server_close()
    assert code == 404 and json.loads(body)["status"] == "unknown"


@pytest.mark.parametrize(
    "path",
    ["/", "/metrics/x", "/metrics/", "/health/", "/health/x", "/favicon.ico", "/x", "/metricsx"],
)
def test_only_metrics_and_health_are_served(serve, path):
    """Any path but /metrics and /health is 404 (real HTTP on an ephemeral port)."""
    port = serve()
    code, body = get(port, path)
    assert code == 404
    assert "mr2nst_" not in body and "status" not in body
    assert get(port, "/metrics")[0] == 200 and get(port, "/health")[0] == 200
    assert get(port, "/metrics?name[]=mr2nst_workers_configured")[0] == 200


def test_metrics_endpoint_binds_loopback_by_default():
    """The endpoint listens on the loopback interface unless configured otherwise."""
    from mr2nst.node.config import MetricsSection

    assert MetricsSection().host in ("127.0.0.1", "::1", "localhost")
