"""Tests of `mr2nst cad-study`: a tiny end-to-end study, its outputs, and bad inputs."""

import json
import shutil

import pytest
import torch

from mr2nst.node.cli.main import main
from mr2nst.node.lab.phantom_io import write_phantom_set

SIZE = (128, 112)
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
def sets(tmp_path_factory):
    """Phantom sets: 8 training (UIH, and GE for Test B's other half), 4 test, 16 GE."""
    root = tmp_path_factory.mktemp("cad")
    write_phantom_set(root / "train", 8, size=SIZE, seed=11)
    write_phantom_set(root / "test", 4, size=SIZE, seed=12)
    write_phantom_set(root / "ge", 16, size=SIZE, seed=13)
    (root / "tiny.toml").write_text(TINY, encoding="utf-8")
    cyclegan = ["train-cyclegan", "--source", str(root / "ge" / "ge"), "--target",
                str(root / "train" / "uih"), "--out", str(root / "cyclegan.pt"), "--epochs", "1",
                "--steps-per-epoch", "2", "--width", "8", "--depth", "1", "--blocks", "1",
                "--crop", "32", "--batch", "2"]  # fmt: skip
    assert main(cyclegan) == 0
    return root


def _args(root, out, *extra):
    return [
        "cad-study",
        "--train",
        str(root / "train" / "uih"),
        "--test-uih",
        str(root / "test" / "uih"),
        "--test-ge",
        str(root / "test" / "ge"),
        "--truth",
        str(root / "test" / "truth"),
        "--out",
        str(out),
        "--quiet",
        "--config",
        str(root / "tiny.toml"),
        *extra,
    ]


@pytest.fixture(scope="module")
def study(sets):
    """One tiny study: passthrough, ehm and cyclegan; Test B with raw, ehm and cyclegan GE at
    1:1 and 1:2."""
    out = sets / "out"
    code = main(
        _args(
            sets,
            out,
            "--train-ge",
            str(sets / "ge" / "ge"),
            "--methods",
            "passthrough,ehm",
            "--cyclegan",
            str(sets / "cyclegan.pt"),
            "--test-b",
            "ehm,cyclegan",
            "--epochs",
            "2",
            "--draws",
            "20",
        )
    )
    assert code == 0
    return out, json.loads((out / "study.json").read_text())


def test_study_json_has_every_row_type_and_metric(study):
    """Per test set and row: ap, recall at 0.5 and 1 FP/image per lesion type, in [0, 1]."""
    _, data = study
    assert set(data["test_a"]) == {"passthrough", "ehm", "cyclegan", "true_uih"}
    assert set(data["test_b"]) == {
        "uih",
        "uih+ge_raw_x1",
        "uih+ge_raw_x2",
        "uih+ge_ehm_x1",
        "uih+ge_ehm_x2",
        "uih+ge_cyclegan_x1",
        "uih+ge_cyclegan_x2",
    }
    assert data["cyclegan"]["checkpoint"].endswith("cyclegan.pt")
    for test in ("test_a", "test_b"):
        for row in data[test].values():
            for kind in ("mass", "calc"):
                for metric in ("ap", "recall_at_0.5fp", "recall_at_1fp"):
                    assert 0.0 <= row[kind][metric] <= 1.0
                assert row[kind]["recall_at_0.5fp"] <= row[kind]["recall_at_1fp"]


def test_rows_carry_paired_bootstrap_intervals_against_their_baseline(study):
    """Each non-baseline row: the difference from the baseline inside its interval."""
    _, data = study
    ehm = data["test_a"]["ehm"]["mass"]["vs_passthrough"]["ap"]
    assert ehm["low"] <= ehm["difference"] + 1e-9 and ehm["difference"] <= ehm["high"] + 1e-9
    assert "vs_passthrough" not in data["test_a"]["passthrough"]["mass"]
    assert "vs_uih" in data["test_b"]["uih+ge_ehm_x2"]["calc"]


def test_splits_counts_and_equal_training_steps(study):
    """Test B takes 8 and 16 GE images; every detector sees the same number of images."""
    _, data = study
    assert data["test_b_counts"]["uih+ge_raw_x1"] == {"uih": 8, "ge": 8}
    assert data["test_b_counts"]["uih+ge_ehm_x2"] == {"uih": 8, "ge": 16}
    trained = data["detector"]["trained"]
    assert trained["uih"]["epochs"] == 2 and trained["uih+ge_raw_x1"]["epochs"] == 1
    assert len(data["splits"]["test"]) == 4 and len(data["splits"]["train_ge"]) == 16
    assert data["splits"]["lesions"]["mass"] > 0 and data["splits"]["lesions"]["calc"] > 0
    assert set(data["splits"]["train_uih"]).isdisjoint(
        {f"ge:{n}" for n in data["splits"]["train_ge"]}
    )


def test_report_and_froc_figure(study):
    """report.md has both tables; froc.png is a PNG; study.json keeps the FROC curves."""
    out, data = study
    report = (out / "report.md").read_text()
    assert "## Test A" in report and "## Test B" in report and "| uih+ge_ehm_x2 |" in report
    assert (out / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = data["froc"]["test_a"]["passthrough"]["calc"]
    assert curve["fp_per_image"][0] == 0 and len(curve["sensitivity"]) == len(curve["fp_per_image"])


@pytest.mark.parametrize(
    ("extra", "change", "expected"),
    [
        (["--methods", "passthrough,nope"], None, "unknown method"),
        (["--test-b", "passthrough"], None, "unknown method"),
        (["--methods", "passthrough,fast"], None, "needs --fast"),
        (["--fast", "missing.pt"], None, "no such file"),
        (["--epochs", "0"], None, "--epochs"),
        (["--ratios", "1,x"], None, "ratios"),
        ([], "no_truth", "no ground truth"),
        ([], "unpaired", "same file names"),
        ([], "no_dir", "not a directory"),
        ([], "cuda_absent", "no CUDA device"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(sets, tmp_path, capsys, extra, change, expected):
    """Every bad input: exit 2, one line on stderr naming the problem."""
    root = tmp_path / "sets"
    shutil.copytree(sets / "train", root / "train")
    shutil.copytree(sets / "test", root / "test")
    shutil.copy(sets / "tiny.toml", root / "tiny.toml")
    if change == "no_truth":
        (root / "test" / "truth" / "case0001.json").unlink()
    elif change == "unpaired":
        (root / "test" / "ge" / "case0001.dcm").rename(root / "test" / "ge" / "other.dcm")
    elif change == "no_dir":
        shutil.rmtree(root / "test" / "uih")
    elif change == "cuda_absent":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        toml = root / "tiny.toml"
        toml.write_text(toml.read_text().replace('device = "cpu"', 'device = "cuda"'))
    code = main(_args(root, tmp_path / "out", "--methods", "passthrough", *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and len(err.splitlines()) == 1
