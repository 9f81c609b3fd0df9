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
    """queue list shows dead work, retry revives it, purge drops it and its files."""
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
    assert main(["queue", "retry", "--json", "--config", str(conf)]) == 0
    assert json.loads(capsys.readouterr().out) == {"revived": 1}

    ledger = Ledger.open(cfg.ledger_url)
    [d] = ledger.claim_deliveries("f", 1, 30)
    ledger.mark_delivery_failed(d.id, 0xC000, "rejected", retry_at=None)
    ledger.close()
    assert main(["queue", "purge", "--json", "--config", str(conf)]) == 0
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
