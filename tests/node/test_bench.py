"""Smoke test of ``mr2nst bench`` at a tiny size (it measures, so nothing is timed here)."""

import json

import pytest

from mr2nst.node.cli.main import main


@pytest.mark.slow
def test_bench_json_compares_the_engine_with_the_plain_loop(tmp_path, capsys):
    """A tiny bench exits 0 with per-tile losses of both runs and a per-scale comparison."""
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--size",
            "128",
            "112",
            "--patch-size",
            "32",
            "--iterations",
            "4",
            "--grids",
            "1",
            "2",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--json",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert [len(x) for x in report["plain"]["final_losses"]] == [1, 4]
    assert report["plain"]["tile_iterations"] == 5 * 4
    optimized = report["engine"]["tiles_optimized"]
    assert sum(len(x) for x in report["engine"]["final_losses"]) == optimized
    assert all(max(x) <= 4 for x in report["engine"]["iterations_run"])
    assert [s["grid"] for s in report["comparison"]["scales"]] == [1, 2]
    assert report["plain"]["peak_rss_mb"] > 0
    assert (report["speedup"] is None) != report["comparison"]["reached"]
