"""`mr2nst train-fast` and method `fast` (tiny engine, seeded-random features, phantoms)."""

from __future__ import annotations

import contextlib
import io
import json

import pydicom
import pytest
import torch
from support import uih_bank_files, write_phantom

from mr2nst.bank.bank import Bank
from mr2nst.node.cli.main import main
from mr2nst.node.config import load_config
from mr2nst.node.errors import ConfigError
from mr2nst.node.methods.fast import load_checkpoint
from mr2nst.node.service.node import Node

ENGINE = 'features = "seeded-random"\ndevice = "cpu"\npatch_size = 32\ngrids = [1, 2]\n'
TINY = ["--width", "8", "--depth", "1", "--crop", "32", "--batch", "2", "--crops-per-image", "2"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast on a small shared machine, and bit-reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(folder, bank, checkpoint, iterations=2):
    """A node config: the tiny engine (the teacher), ``bank``, and the student ``checkpoint``."""
    path = folder / f"config-{iterations}.toml"
    path.write_text(
        f"[engine]\n{ENGINE}iterations = {iterations}\n"
        f"[methods]\nreferences = 2\n[bank]\npath = {str(bank)!r}\nallow_fewer = true\n"
        f"[fast]\ncheckpoint = {str(checkpoint)!r}\n"
    )
    return path


def train(site, out, *extra, iterations=2, cache=None):
    """`mr2nst train-fast` on the site's GE images; (exit code, JSON events on stdout)."""
    args = [
        "train-fast",
        "--source",
        str(site / "ge"),
        "--config",
        str(config(site, site / "bank", out, iterations)),
        "--out",
        str(out),
        "--teacher-cache",
        str(cache or site / "cache"),
        *TINY,
        *extra,
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(args)
    return code, [json.loads(line) for line in stdout.getvalue().splitlines() if line]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two GE sources and a small UIH bank."""
    root = tmp_path_factory.mktemp("fast")
    write_phantom(root / "ge", "g0", vendor="GE", view="CC", laterality="L", seed=1)
    write_phantom(root / "ge", "g1", vendor="GE", view="MLO", laterality="R", seed=2)
    Bank(root / "bank").add([uih_bank_files(root / "bankfiles", per_view_side=1)])
    return root


@pytest.fixture(scope="module")
def trained(site):
    """A finished 2-epoch student; (checkpoint path, its events)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, events = train(site, site / "run" / "fast.pt", "--epochs", "2")
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return site / "run" / "fast.pt", events


def test_checkpoint_records_teacher_architecture_and_training(trained):
    """The checkpoint names its teacher, its architecture and what it was trained on."""
    path, events = trained
    checkpoint = load_checkpoint(path)
    assert checkpoint.student.config.width == 8 and checkpoint.student.config.depth == 1
    assert len(checkpoint.teacher["fingerprint"]) == 16
    assert checkpoint.teacher["settings"]["iterations"] == 2
    assert checkpoint.training["sources"] == 2 and checkpoint.training["epochs"] == 2
    assert len(checkpoint.training["losses"]) == 2
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert {"event": "teacher_cache", "computed": 2, "cached": 0} in events


def test_transfer_with_fast_writes_a_labelled_derived_instance(site, trained, tmp_path):
    """`transfer --method fast` writes derived DICOM whose provenance names the student's
    teacher."""
    path, _ = trained
    out = tmp_path / "out"
    cfg = config(tmp_path, site / "bank", path)
    assert main(["transfer", str(site / "ge" / "g0.dcm"), "--out", str(out), "--config",
                 str(cfg), "--method", "fast"]) == 0  # fmt: skip
    [derived] = list(out.glob("*.dcm"))
    text = pydicom.dcmread(derived).DerivationDescription
    teacher = load_checkpoint(path).teacher["fingerprint"]
    assert "method=fast" in text and f"teacher mr2nst {teacher}" in text


def test_resume_continues_from_the_last_epoch_and_reuses_the_cache(site, tmp_path):
    """A 1-epoch run resumed to 3 epochs trains epochs 2 and 3 only, teacher from the cache."""
    out = tmp_path / "fast.pt"
    cache = tmp_path / "cache"
    code, _ = train(site, out, "--epochs", "1", cache=cache)
    assert code == 0
    code, events = train(site, out, "--epochs", "3", "--resume", cache=cache)
    assert code == 0
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [2, 3]
    assert {"event": "teacher_cache", "computed": 0, "cached": 2} in events
    assert load_checkpoint(out).training["epochs"] == 3


def test_changed_teacher_invalidates_the_cache(site, tmp_path):
    """Other engine settings make a new teacher: its outputs are computed afresh."""
    cache = tmp_path / "cache"
    assert train(site, tmp_path / "a.pt", "--epochs", "1", cache=cache)[0] == 0
    code, events = train(site, tmp_path / "b.pt", "--epochs", "1", iterations=3, cache=cache)
    assert code == 0
    [invalidated] = [e for e in events if e["event"] == "teacher_cache_invalidated"]
    assert len(invalidated["removed"]) == 1
    assert {"event": "teacher_cache", "computed": 2, "cached": 0} in events


def test_checkpoint_of_another_teacher_is_refused(site, trained, tmp_path, capsys):
    """A student trained for 2 iterations is refused by a config with 3: one line, exit 2,
    in `transfer` and at the node's start."""
    path, _ = trained
    other = config(tmp_path, site / "bank", path, iterations=3)
    code = main(["transfer", str(site / "ge"), "--out", str(tmp_path / "o"), "--config",
                 str(other), "--method", "fast"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "trained for another mr2nst setup" in err
    text = other.read_text() + (
        '[[routes]]\nname = "mg"\nmatch = { Modality = "MG" }\nmethod = "fast"\n'
        'destinations = ["cad"]\n[destinations.cad]\nae_title = "CAD"\nhost = "127.0.0.1"\n'
        "port = 104\n[node]\n" + f"data_dir = {str(tmp_path / 'data')!r}\n"
    )
    other.write_text(text)
    with pytest.raises(ConfigError, match="trained for another mr2nst setup"):
        Node(load_config(other)).start()


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("no-config", "no such file"),
        ("empty-source", "no DICOM files"),
        ("exists", "exists: pass --resume"),
    ],
)
def test_bad_inputs_give_one_line_and_exit_2(site, trained, tmp_path, capsys, problem, expected):
    """Missing teacher config, empty source folder, an existing output without --resume."""
    path, _ = trained
    source, cfg, out = site / "ge", config(tmp_path, site / "bank", path), tmp_path / "new.pt"
    if problem == "no-config":
        cfg = tmp_path / "missing.toml"
    elif problem == "empty-source":
        source = tmp_path / "empty"
        source.mkdir()
    else:
        out = path
    code = main(["train-fast", "--source", str(source), "--config", str(cfg), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err


def test_corrupt_checkpoint_gives_one_line_and_exit_2(site, tmp_path, capsys):
    """A checkpoint that is not one: `transfer --method fast` says so in one line (exit 2)."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = config(tmp_path, site / "bank", bad)
    code = main(["transfer", str(site / "ge"), "--out", str(tmp_path / "o"), "--config",
                 str(cfg), "--method", "fast"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a readable checkpoint" in err
