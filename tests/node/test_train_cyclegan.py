"""`mr2nst train-cyclegan`: tiny phantom sets, 2-step epochs, 32-pixel crops."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from mr2nst.node.cli.main import main
from mr2nst.node.lab.phantom_io import write_phantom_set
from mr2nst.node.methods.cyclegan import load_checkpoint

TINY = ["--width", "8", "--depth", "1", "--blocks", "1", "--crop", "32", "--batch", "2"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast on a small shared machine, and bit-reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(site, out, *extra):
    """`mr2nst train-cyclegan --progress` on the site; (exit code, epoch events on stderr)."""
    args = ["train-cyclegan", "--source", str(site / "ge"), "--target", str(site / "uih"),
            "--out", str(out), "--steps-per-epoch", "2", "--progress", *TINY, *extra]  # fmt: skip
    stderr = io.StringIO()  # module fixtures have no capsys
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    lines = stderr.getvalue().splitlines()
    return code, [json.loads(line) for line in lines if line.startswith("{")]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two GE and two UIH phantoms of 96 x 80 pixels."""
    root = tmp_path_factory.mktemp("cyclegan")
    write_phantom_set(root, 2, size=(96, 80), seed=5)
    return root


@pytest.fixture(scope="module")
def trained(site):
    """A finished 1-epoch run; (checkpoint path, its events)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, events = train(site, site / "run" / "cyclegan.pt", "--epochs", "1")
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return site / "run" / "cyclegan.pt", events


def test_checkpoint_records_architecture_and_training(site, trained):
    """The checkpoint holds the generator, its architecture and what it was trained on."""
    path, events = trained
    checkpoint = load_checkpoint(path)
    assert (checkpoint.config.width, checkpoint.config.depth, checkpoint.config.blocks) == (8, 1, 1)
    assert not checkpoint.g.training
    training = checkpoint.training
    assert training["source_images"] == 2 and training["target_images"] == 2
    assert training["source_shapes"] == ["96x80"] and training["target_dir"] == str(site / "uih")
    assert training["epochs"] == 1 and training["steps_per_epoch"] == 2
    assert training["crop"] == 32 and training["batch"] == 2 and training["device"] == "cpu"
    assert set(training["losses"][0]) >= {"epoch", "cycle", "identity", "discriminators"}
    assert [e["epoch"] for e in events] == [1]


def test_resume_continues_counting_epochs(trained, tmp_path):
    """A 1-epoch run resumed to 3 epochs trains epochs 2 and 3 only."""
    path, _ = trained
    out = tmp_path / "cyclegan.pt"
    shutil.copy(path, out)
    code, events = train(path.parent.parent, out, "--epochs", "3", "--resume")
    assert code == 0
    assert [e["epoch"] for e in events] == [2, 3]
    training = load_checkpoint(out).training
    assert training["epochs"] == 3 and [e["epoch"] for e in training["losses"]] == [1, 2, 3]


def test_resumed_run_equals_an_uninterrupted_one(site, trained, tmp_path):
    """1 epoch + 1 resumed epoch give the generator weights of one 2-epoch run."""
    path, _ = trained
    resumed = tmp_path / "resumed.pt"
    shutil.copy(path, resumed)
    assert train(site, resumed, "--epochs", "2", "--resume")[0] == 0
    assert train(site, tmp_path / "straight.pt", "--epochs", "2")[0] == 0
    a, b = load_checkpoint(resumed).g.state_dict(), load_checkpoint(tmp_path / "straight.pt").g
    assert all(torch.equal(a[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--width", "16"], "another architecture"),
        (["--epochs", "1"], "already has 1 epochs"),
    ],
)
def test_resume_refuses_another_architecture_or_no_new_epochs(
    site, trained, tmp_path, capsys, extra, expected
):
    """--resume with other --width, or with no epoch left to train: one line, exit 2."""
    path, _ = trained
    out = tmp_path / "cyclegan.pt"
    shutil.copy(path, out)
    args = ["train-cyclegan", "--source", str(site / "ge"), "--target", str(site / "uih"),
            "--out", str(out), "--resume", *TINY, *extra]  # fmt: skip
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("missing-source", "not a directory"),
        ("empty-target", "no DICOM files"),
        ("no-dicoms", "no DICOM files"),
        ("crop-too-large", "larger than"),
        ("crop-off-stride", "multiple of the stride"),
        ("zero-steps", "--steps-per-epoch 0: must be at least 1"),
        ("bad-width", "cyclegan.width"),
        ("exists", "exists: pass --resume"),
        ("resume-nothing", "does not exist"),
        ("resume-foreign", "not a CycleGAN checkpoint"),
        ("cuda-absent", "no CUDA device"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_2(site, trained, tmp_path, capsys, problem, expected):
    """Bad folders, numbers, outputs and saved states: one line on stderr, exit 2."""
    source, target, out = site / "ge", site / "uih", tmp_path / "new.pt"
    extra = [*TINY, "--epochs", "1", "--steps-per-epoch", "1"]  # short, should one pass
    if problem == "missing-source":
        source = tmp_path / "missing"
    elif problem == "empty-target":
        target = tmp_path / "empty"
        target.mkdir()
    elif problem == "no-dicoms":
        target = site / "truth"  # JSON and PNG only
    elif problem == "crop-too-large":
        extra += ["--crop", "128"]
    elif problem == "crop-off-stride":
        extra += ["--crop", "35"]
    elif problem == "zero-steps":
        extra += ["--steps-per-epoch", "0"]
    elif problem == "bad-width":
        extra += ["--width", "3"]
    elif problem == "exists":
        out = trained[0]
    elif problem == "resume-nothing":
        extra += ["--resume"]
    elif problem == "cuda-absent":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        extra += ["--device", "cuda"]
    else:
        torch.save({"kind": "something-else"}, out)
        extra += ["--resume"]
    code = main(["train-cyclegan", "--source", str(source), "--target", str(target),
                 "--out", str(out), *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err
