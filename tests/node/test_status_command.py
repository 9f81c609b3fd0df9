"""Tests of `mr2nst status`: the node's status file plus the ledger's queues, human and JSON."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from ledger_rows import attempt, delivery, instance
from structlog.testing import capture_logs

from mr2nst.node.cli.main import main
from mr2nst.node.config import parse_config
from mr2nst.node.ledger import Ledger
from mr2nst.node.service.health import NodeStatus, read_status, write_status


@pytest.fixture
def site(tmp_path):
    """A config file with one destination and its data_dir; returns (config path, data_dir)."""
    data = tmp_path / "data"
    conf = tmp_path / "node.toml"
    conf.write_text(
        f'[node]\ndata_dir = "{data}"\nmin_free_disk_mb = 0\n'
        '[destinations.cad]\nae_title = "CAD"\nhost = "127.0.0.1"\nport = 1\n'
    )
    return conf, data


def node_status(**changes) -> NodeStatus:
    """A status file's content for this process, written just now."""
    now = time.time()
    values = dict(
        pid=os.getpid(),
        host=socket.gethostname(),
        version="0.0",
        ae_title="MR2NST",
        port=11112,
        metrics="",
        started_at=now - 3725,
        updated_at=now,
        workers_alive=1,
        workers_configured=1,
        weights="not needed (no route uses the mr2nst method)",
    )
    values.update(changes)
    return NodeStatus(**values)


def run_status(conf, capsys, *extra):
    """`mr2nst status --config conf [extra]`: (exit code, stdout)."""
    code = main(["status", "--config", str(conf), *extra])
    return code, capsys.readouterr().out


def test_not_running_without_status_file(site, capsys):
    """No status file: exit 1, said plainly, and no ledger is created to report on."""
    conf, data = site
    code, out = run_status(conf, capsys)
    assert code == 1
    assert "NOT RUNNING: no status file" in out
    assert "LANE" in out and "DESTINATION" in out and "cad" in out
    code, out = run_status(conf, capsys, "--json")
    report = json.loads(out)
    assert code == 1 and report["running"] is False and report["uptime_s"] is None
    assert not (data / "ledger.db").exists()


def test_running_node_with_queues_and_last_errors(site, capsys):
    """A fresh status file of a live pid: exit 0, uptime, lanes, destinations, last error."""
    conf, data = site
    data.mkdir()
    cfg = parse_config({"node": {"data_dir": str(data)}}, environ={})
    ledger = Ledger.open(cfg.ledger_url)
    now = time.time()
    instance(ledger, state="received", received_at=now - 90)
    dead = instance(ledger, state="transformed", received_at=now - 600)
    d = delivery(
        ledger, dead, "cad", state="dead", error="rejected", last_status=0xA900, updated_at=now - 30
    )
    attempt(
        ledger,
        dead,
        stage="deliver",
        outcome="dead",
        at=now - 30,
        destination="cad",
        delivery_id=d,
        status=0xA900,
        reason="0xA900 rejected by the peer",
    )
    waiting = instance(ledger, state="transformed", lane="forward", received_at=now - 30)
    delivery(ledger, waiting, "archive", state="failed", error="connection refused")
    ledger.close()
    write_status(data, node_status())

    code, out = run_status(conf, capsys, "--json")
    report = json.loads(out)
    assert code == 0 and report["running"] is True and report["uptime_s"] >= 3725
    assert report["workers"] == {"alive": 1, "configured": 1}
    assert report["lanes"]["method"]["depth"] == 1
    assert 80 <= report["lanes"]["method"]["oldest_age_s"] < 200
    assert report["lanes"]["forward"]["depth"] == 1
    cad = report["destinations"]["cad"]
    assert cad["depth"] == 0 and cad["dead"] == 1
    assert cad["last_error"]["status"] == "0xA900"
    assert cad["last_error"]["reason"] == "0xA900 rejected by the peer"
    assert report["destinations"]["archive"]["depth"] == 1
    assert report["disk"]["ok"] is True

    code, out = run_status(conf, capsys)
    assert code == 0
    assert "running, pid" in out and "up 1h 02m" in out
    header = next(line for line in out.splitlines() if line.startswith("DESTINATION"))
    assert header.split() == ["DESTINATION", "DEPTH", "OLDEST", "DEAD", "LAST", "ERROR"]
    assert any(line.startswith("cad") and "0xA900" in line for line in out.splitlines())


def test_stale_status_file_means_not_running(site, capsys):
    """A status file not refreshed for minutes: the node hangs or is gone (exit 1)."""
    conf, data = site
    data.mkdir()
    write_status(data, node_status(updated_at=time.time() - 300))
    code, out = run_status(conf, capsys, "--json")
    assert code == 1 and "not refreshed" in json.loads(out)["reason"]


def test_gone_pid_means_not_running(site, capsys):
    """A status file whose process no longer exists: killed or crashed (exit 1)."""
    conf, data = site
    data.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    write_status(data, node_status(pid=proc.pid))
    code, out = run_status(conf, capsys)
    assert code == 1 and f"process {proc.pid} is gone" in out


def test_bad_config_exits_2(tmp_path, capsys):
    """A config with an unknown key is a config error: exit 2, one line."""
    conf = tmp_path / "bad.toml"
    conf.write_text("[node]\nnope = 1\n")
    assert main(["status", "--config", str(conf)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_node_writes_status_and_health_then_stops(tmp_path, capsys):
    """A started node: status says running and /health is 200; after stop, not running."""
    from mr2nst.node.service.node import Node

    data = tmp_path / "data"
    port = free_port()
    conf = tmp_path / "node.toml"  # what `mr2nst status` reads: the same data_dir
    conf.write_text(f'[node]\ndata_dir = "{data}"\nmin_free_disk_mb = 0\n')
    cfg = parse_config(
        {
            "node": {"data_dir": str(data), "host": "127.0.0.1", "port": 0, "min_free_disk_mb": 0},
            "metrics": {"host": "127.0.0.1", "port": port},
            "routes": [{"name": "mg", "method": "passthrough", "destinations": ["cad"]}],
            "destinations": {"cad": {"ae_title": "CAD", "host": "127.0.0.1", "port": 1}},
        },
        environ={},
    )
    with capture_logs() as logs:
        node = Node(cfg).start()
    try:
        [started] = [e for e in logs if e["event"] == "node_started"]
        assert "features" not in started and "weights" not in started  # no mr2nst route
        status = read_status(data)
        assert status is not None and status.pid == os.getpid() and status.port == node.port
        code, out = run_status(conf, capsys, "--json")
        assert code == 0 and json.loads(out)["workers"]["configured"] == 2  # count 1 + light 1
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    finally:
        node.stop()
    code, out = run_status(conf, capsys)
    assert code == 1 and "NOT RUNNING: stopped at" in out


def test_unreachable_ledger_is_reported_not_a_crash(tmp_path, capsys):
    """A ledger that cannot be opened is one line of the status; the node part still shows."""
    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "node.toml"
    conf.write_text(
        f'[node]\ndata_dir = "{data}"\nmin_free_disk_mb = 0\n'
        f'[ledger]\nurl = "sqlite:///{tmp_path / "no" / "such" / "ledger.db"}"\n'
    )
    write_status(data, node_status())
    code, out = run_status(conf, capsys)
    assert code == 0 and "running, pid" in out
    assert "ledger    UNREACHABLE: cannot open ledger" in out
    code, out = run_status(conf, capsys, "--json")
    assert json.loads(out)["ledger_error"].startswith("cannot open ledger")
