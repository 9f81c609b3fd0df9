"""Tests of `mr2nst train-refiner` (tiny engine, seeded-random features, phantom data)."""

from __future__ import annotations

import contextlib
import io
import shutil

import pydicom
import pytest
import torch
from support import uih_bank_files, write_phantom

from mr2nst.bank.bank import Bank
from mr2nst.core.refiner import checkpoint_info
from mr2nst.node.cli.main import main

ENGINE = 'features = "seeded-random"\ndevice = "cpu"\npatch_size = 32\ngrids = [1, 2]\n'
FAST = ["--epochs", "1", "--crop", "64", "--batch", "2", "--steps", "2", "--seed", "4"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast on a small shared machine, and bit-reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(folder, bank, iterations=2, refiner=""):
    """A node config with the tiny engine, ``bank`` and (optionally) a trained refiner."""
    path = folder / f"config-{iterations}-{bool(refiner)}.toml"
    path.write_text(
        f"[engine]\n{ENGINE}iterations = {iterations}\nrefiner = {str(refiner)!r}\n"
        f"[methods]\nreferences = 2\n[bank]\npath = {str(bank)!r}\nallow_fewer = true\n"
    )
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two GE sources, two UIH targets, a small UIH bank and a config for them."""
    root = tmp_path_factory.mktemp("train")
    write_phantom(root / "ge", "g0", vendor="GE", view="CC", laterality="L", seed=1)
    write_phantom(root / "ge", "g1", vendor="GE", view="MLO", laterality="R", seed=2)
    write_phantom(root / "uih", "u0", vendor="UIH", view="CC", laterality="R", seed=3)
    write_phantom(root / "uih", "u1", vendor="UIH", view="MLO", laterality="L", seed=4)
    Bank(root / "bank").add([uih_bank_files(root / "bankfiles", per_view_side=1)])
    return root


@pytest.fixture(scope="module")
def trained(site):
    """One finished 1-epoch run; returns (refiner path, its stdout)."""
    out = site / "run" / "refiner.pt"
    stdout = io.StringIO()  # module scope has no capsys
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout):
            code = _train(site, out)
    finally:
        torch.set_num_threads(before)
    assert code == 0
    return out, stdout.getvalue()


def _train(site, out, *extra, cache=None):
    """`mr2nst train-refiner` of the site's images into ``out``; returns the exit code."""
    args = [
        "train-refiner",
        "--source",
        str(site / "ge"),
        "--target",
        str(site / "uih"),
        "--out",
        str(out),
        "--config",
        str(_config(site, site / "bank")),
        *FAST,
        *extra,
    ]
    if cache is not None:
        args += ["--cache", str(cache)]
    return main(args)


@pytest.mark.slow
def test_run_writes_refiner_state_and_cache(trained):
    """A run writes the refiner, the resumable state next to it and the cached scales."""
    out, stdout = trained
    assert out.is_file() and out.with_name("refiner.pt.state").is_file()
    scales = sorted((out.parent / "refiner-cache").glob("scales-*/*.scales.npy"))
    assert len(scales) == 2
    assert "2 computed, 0 from the cache" in stdout and "epoch 1/1: loss_d" in stdout


@pytest.mark.slow
def test_checkpoint_records_engine_setup_and_training(trained):
    """The checkpoint names the engine settings, the feature weights id and how it was trained."""
    info = checkpoint_info(trained[0])
    assert info["engine_config"]["iterations"] == 2 and info["engine_config"]["grids"] == [1, 2]
    assert info["weights_id"] == "seeded-random:seed=0"
    training = info["training"]
    assert training["epochs"] == 1 and training["steps"] == 2 and training["sources"] == 2
    assert training["settings"]["seed"] == 4 and len(training["history"]) == 1


@pytest.mark.slow
def test_resume_continues_and_reuses_the_cache(site, trained, capsys):
    """A second run reuses the cached scales; --resume continues from the saved epoch."""
    cache = trained[0].parent / "refiner-cache"
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")}
    out = site / "resume" / "refiner.pt"
    assert _train(site, out, cache=cache) == 0
    assert "0 computed, 2 from the cache" in capsys.readouterr().out
    assert _train(site, out, "--resume", "--epochs", "2", cache=cache) == 0
    stdout = capsys.readouterr().out
    assert "resuming after epoch 1 (step 2)" in stdout and "epoch 2/2" in stdout
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy")} == before
    assert checkpoint_info(out)["training"]["epochs"] == 2


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(site, trained, capsys):
    """1 epoch + --resume to 2 epochs gives the same refiner as 2 epochs in one go."""
    cache = trained[0].parent / "refiner-cache"
    a, b = site / "a" / "refiner.pt", site / "b" / "refiner.pt"
    assert _train(site, a, "--epochs", "2", cache=cache) == 0
    assert _train(site, b, cache=cache) == 0
    assert _train(site, b, "--resume", "--epochs", "2", cache=cache) == 0
    capsys.readouterr()
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_existing_state_needs_resume_and_same_settings(site, trained, capsys):
    """An existing state is kept without --resume, and --resume with other settings is refused."""
    out, _ = trained
    assert _train(site, out) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert _train(site, out, "--resume", "--seed", "9") == 2
    assert "settings differs from the saved run" in capsys.readouterr().err


def test_wrong_vendor_is_refused(site, tmp_path, capsys):
    """UIH images given as sources are refused with exit 2, naming the file and the vendor."""
    code = main(
        [
            "train-refiner",
            "--source",
            str(site / "uih"),
            "--target",
            str(site / "uih"),
            "--out",
            str(tmp_path / "r.pt"),
            "--config",
            str(_config(site, site / "bank")),
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "u0.dcm" in err and "'GE*'" in err and "Manufacturer 'UIH'" in err
    assert len(err.strip().splitlines()) == 1


def test_wrong_view_is_refused(site, tmp_path, capsys):
    """A source that is not CC or MLO is refused with exit 2, naming the view found."""
    shutil.copytree(site / "ge", tmp_path / "ge")
    write_phantom(tmp_path / "ge", "ml", vendor="GE", view="MLO", seed=5, ViewPosition="ML")
    code = main(
        [
            "train-refiner",
            "--source",
            str(tmp_path / "ge"),
            "--target",
            str(site / "uih"),
            "--out",
            str(tmp_path / "r.pt"),
            "--config",
            str(_config(site, site / "bank")),
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "ml.dcm" in err and "view 'ML'" in err


@pytest.mark.slow
def test_transfer_uses_the_trained_refiner(site, trained, tmp_path, capsys):
    """engine.refiner = OUT makes `mr2nst transfer` use it, and DerivationDescription names it."""
    config = _config(tmp_path, site / "bank", refiner=trained[0])
    code = main(
        [
            "transfer",
            str(site / "ge" / "g0.dcm"),
            "--out",
            str(tmp_path / "out"),
            "--config",
            str(config),
            "--method",
            "mr2nst",
        ]
    )
    capsys.readouterr()
    assert code == 0
    (derived,) = (tmp_path / "out").glob("*.dcm")
    assert "refiner refiner.pt" in pydicom.dcmread(derived).DerivationDescription


@pytest.mark.slow
def test_refiner_for_another_engine_setup_is_refused(site, trained, tmp_path, capsys):
    """Loading the refiner into an engine with other settings exits 2, naming the setting."""
    config = _config(tmp_path, site / "bank", iterations=3, refiner=trained[0])
    code = main(
        [
            "transfer",
            str(site / "ge" / "g0.dcm"),
            "--out",
            str(tmp_path / "out"),
            "--config",
            str(config),
            "--method",
            "mr2nst",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "engine_config.iterations" in err
