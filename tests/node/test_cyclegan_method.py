"""Method `cyclegan`: checkpoint checks, the output, the registry, transfer and evaluate."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch
from support import uih_bank_files, write_phantom

from mr2nst.bank.bank import Bank
from mr2nst.core.cyclegan import CYCLEGAN_REVISION, Generator, GeneratorConfig
from mr2nst.core.engine import EngineConfig
from mr2nst.node.cli.main import main
from mr2nst.node.config import load_config
from mr2nst.node.dicom.pixels import decode
from mr2nst.node.errors import ConfigError
from mr2nst.node.lab.phantom_io import write_phantom_set
from mr2nst.node.methods.cyclegan import CHECKPOINT_KIND, cyclegan_method, load_checkpoint
from mr2nst.node.methods.registry import check_cyclegan
from mr2nst.node.service.node import Node

SMALL = GeneratorConfig(width=8, depth=1, blocks=1, tile=64)


def save_generator(path, config=SMALL, **changes):
    """A checkpoint of an untrained generator (the identity), as train-cyclegan writes it."""
    torch.manual_seed(0)
    data = {
        "kind": CHECKPOINT_KIND,
        "revision": CYCLEGAN_REVISION,
        "generator": config.as_dict(),
        "g": Generator(config).state_dict(),
        "training": {"epochs": 0},
        **changes,
    }
    torch.save(data, path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A small UIH bank, a GE source of 128 x 96 and an untrained generator's checkpoint."""
    root = tmp_path_factory.mktemp("cyclegan-method")
    Bank(root / "bank").add([uih_bank_files(root / "bankfiles", per_view_side=1)])
    write_phantom(root / "ge", "g0", vendor="GE", view="CC", laterality="L", size=(128, 96))
    save_generator(root / "gen.pt")
    return root


def node_config(folder, site, checkpoint, tone="linear"):
    """A node config whose route runs method cyclegan with ``checkpoint``."""
    path = folder / "node.toml"
    path.write_text(
        f'[engine]\nfeatures = "seeded-random"\ndevice = "cpu"\ntone = "{tone}"\n'
        f"[methods]\nreferences = 2\n[bank]\npath = {str(site / 'bank')!r}\nallow_fewer = true\n"
        f"[cyclegan]\ncheckpoint = {str(checkpoint)!r}\n"
        '[[routes]]\nname = "mg"\nmatch = { Modality = "MG" }\nmethod = "cyclegan"\n'
        'destinations = ["cad"]\n[destinations.cad]\nae_title = "CAD"\nhost = "127.0.0.1"\n'
        f"port = 104\n[node]\ndata_dir = {str(folder / 'data')!r}\n"
    )
    return path


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("missing", "no such file"),
        ("garbage", "not a readable checkpoint"),
        ("kind", "not a CycleGAN checkpoint"),
        ("revision", f"this build needs {CYCLEGAN_REVISION}"),
        ("shape", "does not fit the generator architecture"),
    ],
)
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, problem, expected):
    """Missing, unreadable, foreign, other-revision and misfitting checkpoints: ConfigError."""
    path = tmp_path / "gen.pt"
    if problem == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif problem == "kind":
        save_generator(path, kind="mr2nst-fast-student")
    elif problem == "revision":
        save_generator(path, revision=CYCLEGAN_REVISION + 1)
    elif problem == "shape":
        save_generator(path, generator={**SMALL.as_dict(), "width": 16})
    with pytest.raises(ConfigError, match=expected) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(info.value).startswith("cyclegan.checkpoint")


def test_untrained_generator_gives_the_scaled_source_in_the_bank_range(site):
    """The identity generator: output = robust-scaled source mapped linearly to the bank's
    range, background the bank's; provenance names the generator and the tone."""
    src = decode(pydicom.dcmread(site / "ge" / "g0.dcm"))
    bank = Bank(site / "bank")
    method, checkpoint = cyclegan_method(
        site / "gen.pt", EngineConfig(tone="linear"), bank, 2, True, "test"
    )
    result = method(src.image, src.info)
    prepared = method.prepare(src.image, src.info)
    stats = bank.stats()
    expected = stats.low + prepared.content * np.float32(stats.high - stats.low)
    mask = prepared.mask
    assert result.image.shape == src.image.shape and result.image.dtype == np.float32
    assert result.image.min() >= 0.0 and result.image.max() <= 1.0
    np.testing.assert_allclose(result.image[mask], np.clip(expected[mask], 0, 1), atol=1e-5)
    assert np.all(result.image[~mask] == np.float32(stats.background))
    prov = result.provenance
    assert prov.method == "cyclegan" and prov.features.startswith("cyclegan:")
    assert prov.scales == () and len(prov.references) == 2
    assert "generator width 8 depth 1 blocks 1" in prov.notes[0]
    assert "checkpoint gen.pt" in prov.notes and "tone linear" in prov.notes
    assert checkpoint.training == {"epochs": 0}


def test_tone_ehm_gives_the_references_histogram_and_a_new_fingerprint(site):
    """tone = "ehm" maps as the mr2nst method does, and is part of the fingerprint."""
    src = decode(pydicom.dcmread(site / "ge" / "g0.dcm"))
    bank = Bank(site / "bank")
    linear, _ = cyclegan_method(site / "gen.pt", EngineConfig(tone="linear"), bank, 2, True, "t")
    ehm, _ = cyclegan_method(site / "gen.pt", EngineConfig(tone="ehm"), bank, 2, True, "t")
    assert linear.fingerprint() != ehm.fingerprint()
    result = ehm(src.image, src.info)
    assert "tone ehm" in result.provenance.notes
    assert not np.allclose(result.image, linear(src.image, src.info).image)


def test_transfer_with_cyclegan_writes_a_labelled_derived_instance(site, tmp_path):
    """`transfer --method cyclegan` writes derived DICOM whose provenance names the method."""
    cfg = node_config(tmp_path, site, site / "gen.pt")
    out = tmp_path / "out"
    code = main(["transfer", str(site / "ge"), "--out", str(out), "--config", str(cfg),
                 "--method", "cyclegan"])  # fmt: skip
    assert code == 0
    [derived] = list(out.glob("*.dcm"))
    text = pydicom.dcmread(derived).DerivationDescription
    assert "method=cyclegan" in text and "generator width 8" in text


def test_missing_checkpoint_stops_transfer_and_the_node_at_start(site, tmp_path, capsys):
    """No checkpoint set, or a missing file: one line, exit 2, and the node does not start."""
    cfg = node_config(tmp_path, site, "")
    code = main(["transfer", str(site / "ge"), "--out", str(tmp_path / "o"), "--config",
                 str(cfg), "--method", "cyclegan"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "cyclegan.checkpoint: not set" in err
    with pytest.raises(ConfigError, match="cyclegan.checkpoint: not set"):
        Node(load_config(cfg)).start()
    missing = node_config(tmp_path, site, tmp_path / "gone.pt")
    with pytest.raises(ConfigError, match="no such file"):
        check_cyclegan(load_config(missing))


@pytest.mark.slow
def test_evaluate_with_cyclegan_adds_a_row_without_the_engine(site, tmp_path):
    """--cyclegan adds the cyclegan row and its checkpoint to run.json (ehm + cyclegan only)."""
    write_phantom_set(tmp_path / "src", 2, size=(128, 96), seed=21)
    write_phantom_set(tmp_path / "tgt", 4, size=(128, 96), seed=921)
    config = tmp_path / "tiny.toml"
    # imagenet features with no weights file: the row must not need the feature network.
    config.write_text(
        '[methods]\nreferences = 2\n[engine]\nfeatures = "imagenet"\n'
        f'weights = "{tmp_path / "absent.pth"}"\ndevice = "cpu"\ntone = "linear"\n',
        encoding="utf-8",
    )
    code = main(["evaluate", "--source", str(tmp_path / "src" / "ge"), "--target",
                 str(tmp_path / "tgt" / "uih"), "--truth", str(tmp_path / "src"), "--out",
                 str(tmp_path / "out"), "--config", str(config), "--methods", "ehm",
                 "--cyclegan", str(site / "gen.pt"), "--classifier-steps", "2"])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(metrics) == ["ehm", "cyclegan"]
    assert metrics["cyclegan"]["ssim"]["n"] == 2 and metrics["cyclegan"]["seconds"] is not None
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["cyclegan"]["generator"]["width"] == 8 and run["cyclegan"]["tone"] == "linear"
    assert "| cyclegan |" in (tmp_path / "out" / "report.md").read_text()
