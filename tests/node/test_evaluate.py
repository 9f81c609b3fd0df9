"""Tests of `mr2nst evaluate`: target split, report structure and a tiny end-to-end run."""

import json
from pathlib import Path

import pytest

from mr2nst.node.cli.main import main
from mr2nst.node.lab.evaluate import METHODS, METRICS, split_target
from mr2nst.node.lab.phantom_io import write_phantom_set

TINY = """[methods]
references = 2
[engine]
features = "seeded-random"
device = "cpu"
patch_size = 32
grids = [1, 2]
iterations = 2
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny evaluation of every method (2 sources, 8 targets); returns (exit code, out)."""
    root = tmp_path_factory.mktemp("evaluate")
    write_phantom_set(root / "src", 2, size=(160, 128), seed=7)
    write_phantom_set(root / "tgt", 8, size=(160, 128), seed=907)
    (root / "tiny.toml").write_text(TINY, encoding="utf-8")
    out = root / "out"
    code = main(
        [
            "evaluate",
            "--source",
            str(root / "src" / "ge"),
            "--target",
            str(root / "tgt" / "uih"),
            "--truth",
            str(root / "src"),
            "--out",
            str(out),
            "--config",
            str(root / "tiny.toml"),
            "--domain-source",
            str(root / "tgt" / "ge"),
            "--classifier-steps",
            "2",
        ]
    )
    return code, out


def test_split_holds_out_every_fourth_file():
    """Sorted by name, files 3, 7, ... are held out and the rest form the bank."""
    files = [Path(f"case{i:04d}.dcm") for i in range(9)][::-1]
    bank, held = split_target(files)
    assert [p.name for p in held] == ["case0003.dcm", "case0007.dcm"]
    assert len(bank) == 7 and not set(bank) & set(held)


@pytest.mark.slow
def test_metrics_json_has_every_method_and_metric(run):
    """metrics.json: every method, every metric as {mean, sd, n} or null."""
    code, out = run
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == list(METHODS)
    for values in metrics.values():
        assert list(values) == list(METRICS)
        for summary in values.values():
            assert summary is None or (set(summary) == {"mean", "sd", "n"} and summary["n"] >= 1)
    assert all(v is None for v in metrics["mr2nst_s2"].values())  # grids [1, 2]: no scale 2
    assert metrics["passthrough"]["ssim"]["n"] == 2 and metrics["mr2nst"]["seconds"] is not None
    assert metrics["mr2nst_s0"]["seconds"] is None  # taken from the mr2nst run: no cost of its own


@pytest.mark.slow
def test_report_and_figures_exist(run):
    """report.md has a table row per method plus the reference row; the PNGs are written."""
    _, out = run
    report = (out / "report.md").read_text()
    for name in (*METHODS, "true_target"):
        assert f"| {name} |" in report
    assert "NIMA" in report and "seeded-random" in report
    assert (out / "metrics.png").stat().st_size > 0 and (out / "montage.png").stat().st_size > 0
    details = json.loads((out / "run.json").read_text())
    assert details["held_out_targets"] == 2 and details["bank_references"] == 6
    assert set(details["paired_tests"]) == {"mr2nst", "passthrough"}
    assert details["metric_features"].startswith(
        "hed-vgg16"
    )  # engine seeded-random: not its own net
    assert "low-pass SSIM" in report and "spectrum dist" in report


@pytest.mark.slow
def test_texture_metrics_separate_source_from_true_target(run):
    """The true target scores sharpness and low-pass SSIM 1; the soft GE source scores lower."""
    # ... and the source is further from the held-out targets' spectrum than the true target.
    _, out = run
    ref = json.loads((out / "run.json").read_text())["reference_row"]
    source = json.loads((out / "metrics.json").read_text())["passthrough"]
    assert ref["sharpness_ratio"]["mean"] == pytest.approx(1.0)
    assert ref["structure_ssim"]["mean"] == pytest.approx(1.0)
    assert source["sharpness_ratio"]["mean"] < 0.6
    assert source["spectrum_dist"]["mean"] > ref["spectrum_dist"]["mean"]


def test_montage_zooms_find_the_cluster_and_an_edge_away_from_it():
    """The µC zoom centres on the densest group; the edge zoom on a step edge, not on the µCs."""
    import numpy as np

    from mr2nst.node.lab.report import edge_centre, uc_cluster_centre

    calcs = np.array([[20.0, 20.0, 2.0], [22.0, 24.0, 2.0], [24.0, 20.0, 2.0], [90.0, 90.0, 2.0]])
    assert uc_cluster_centre(calcs) == pytest.approx((22.0, 64.0 / 3.0))
    assert uc_cluster_centre(np.zeros((0, 3))) is None
    image = np.zeros((128, 128))
    image[:, 70:] = 1.0  # a vertical step edge between columns 69 and 70
    for r, c, _ in calcs[:3]:
        image[int(r), int(c)] = 5.0  # bright µCs: stronger gradients, but excluded
    row, col = edge_centre(image, np.ones_like(image, dtype=bool), calcs)
    assert col in (69.0, 70.0) and np.hypot(row - 22.0, col - 21.0) > 36


def test_unknown_method_is_a_usage_error(tmp_path, capsys):
    """An unknown --methods entry exits 2 with a one-line reason."""
    code = main(
        [
            "evaluate",
            "--source",
            str(tmp_path),
            "--target",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--methods",
            "passthrough,nosuchmethod",
        ]
    )
    assert code == 2 and "nosuchmethod" in capsys.readouterr().err


@pytest.mark.slow
def test_refiner_adds_a_trained_row_from_the_same_scales(tmp_path):
    """--refiner adds mr2nst_trained: the same run's scales merged by the checkpoint."""
    # A checkpoint that keeps only scale 0 gives scores other than the plain average's, and
    # equal to mr2nst_s0's where the mapping to the target range is the same.
    import torch

    from mr2nst.core.engine import Mr2nstEngine
    from mr2nst.core.refiner import Refiner, save_refiner
    from mr2nst.node.config import load_config

    write_phantom_set(tmp_path / "src", 2, size=(160, 128), seed=11)
    write_phantom_set(tmp_path / "tgt", 8, size=(160, 128), seed=911)
    config = tmp_path / "tiny.toml"
    # The average of the scales and the linear tone: the trained row's mapping is then the
    # scale rows' (bands, detail mode and tone "ehm" are finished differently).
    paper = 'merge = "average"\ntone = "linear"\ndetail_sigma = 0.0\nresample = "image"\n'
    config.write_text(TINY + paper, encoding="utf-8")
    refiner = Refiner(2)
    with torch.no_grad():
        refiner.scale_weights.copy_(torch.tensor([1.0, 0.0]))
    expected = Mr2nstEngine(load_config(str(config)).engine.core()).refiner_expectation()
    save_refiner(refiner, tmp_path / "refiner.pt", expected)
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "--source",
            str(tmp_path / "src" / "ge"),
            "--target",
            str(tmp_path / "tgt" / "uih"),
            "--truth",
            str(tmp_path / "src"),
            "--out",
            str(out),
            "--config",
            str(config),
            "--methods",
            "mr2nst,mr2nst_s0",
            "--refiner",
            str(tmp_path / "refiner.pt"),
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["mr2nst", "mr2nst_s0", "mr2nst_trained"]
    trained, merged, s0 = (
        metrics[m]["ssim"]["mean"] for m in ("mr2nst_trained", "mr2nst", "mr2nst_s0")
    )
    assert trained != merged
    assert trained == pytest.approx(s0, abs=1e-6)
    assert metrics["mr2nst_trained"]["seconds"] is not None  # the run's cost plus the merge
    assert "| mr2nst_trained |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_fast_adds_a_row_and_refuses_a_student_of_another_bank(tmp_path, capsys):
    """--fast adds the student's row; a student trained on another bank is refused (exit 2)."""
    from mr2nst.bank.bank import Bank

    write_phantom_set(tmp_path / "src", 2, size=(160, 128), seed=12)
    write_phantom_set(tmp_path / "tgt", 8, size=(160, 128), seed=912)
    refs, _ = split_target(sorted((tmp_path / "tgt" / "uih").glob("*.dcm")))
    Bank(tmp_path / "bank").add(refs)  # the bank evaluate builds from --target
    config = tmp_path / "tiny.toml"
    config.write_text(
        TINY + f'[bank]\npath = "{tmp_path / "bank"}"\nallow_fewer = true\n', encoding="utf-8"
    )
    student = tmp_path / "fast.pt"
    tiny = ["--width", "8", "--depth", "1", "--crop", "32", "--crops-per-image", "2"]
    assert (
        main(
            [
                "train-fast",
                "--source",
                str(tmp_path / "tgt" / "ge"),
                "--config",
                str(config),
                "--out",
                str(student),
                "--epochs",
                "1",
                *tiny,
            ]
        )  # fmt: skip
        == 0
    )

    def evaluate(target: Path, out: Path) -> int:
        return main(
            [
                "evaluate",
                "--source",
                str(tmp_path / "src" / "ge"),
                "--target",
                str(target),
                "--truth",
                str(tmp_path / "src"),
                "--out",
                str(out),
                "--config",
                str(config),
                "--methods",
                "ehm,mr2nst",
                "--fast",
                str(student),
            ]  # fmt: skip
        )

    assert evaluate(tmp_path / "tgt" / "uih", tmp_path / "out") == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics) == ["ehm", "mr2nst", "fast"]
    assert metrics["fast"]["ssim"]["n"] == 2 and metrics["fast"]["seconds"] is not None
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["fast"]["teacher"]["settings"]["iterations"] == 2
    assert "| fast |" in (tmp_path / "out" / "report.md").read_text()

    capsys.readouterr()
    other = tmp_path / "other"
    write_phantom_set(other, 8, size=(160, 128), seed=913)  # another bank
    assert evaluate(other / "uih", tmp_path / "out2") == 2
    assert "trained for another mr2nst setup" in capsys.readouterr().err
