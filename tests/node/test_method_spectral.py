"""Tests of the `spectral` method.

EHM plus a clipped spectral gain towards the bank's references.
"""

import numpy as np
import pydicom
import pytest
from support import write_phantom

from mr2nst.bank.manifest import UNIT_SCALE
from mr2nst.core.ehm import target_quantiles
from mr2nst.core.segmentation import segment_breast
from mr2nst.core.spectral import SpectralConfig
from mr2nst.node.config import parse_config
from mr2nst.node.dicom.pixels import decode
from mr2nst.node.errors import ConfigError
from mr2nst.node.methods.registry import FACTORIES, check_methods
from mr2nst.node.methods.spectral import SpectralMethod
from mr2nst.node.service.transfer import run_transfer


def pooled_breast_pixels(bank, uids) -> np.ndarray:
    """The breast pixels of the bank references ``uids``, pooled, as the methods read them."""
    entries = {e.sop_instance_uid: e for e in bank.entries()}
    pixels = []
    for uid in uids:
        image = np.asarray(bank.layout.load_image(entries[uid]), dtype=np.float32)
        pixels.append((image / np.float32(UNIT_SCALE))[bank.layout.load_mask(entries[uid])])
    return np.concatenate(pixels)


ROUTE = {"name": "ge", "method": "spectral", "destinations": ["cad"]}
CAD = {"cad": {"ae_title": "CAD", "host": "127.0.0.1", "port": 104}}


def test_runs_on_a_phantom_bank(tmp_path, bank):
    """The method returns the bank's target range, the references' histogram, and names itself."""
    src = decode(
        pydicom.dcmread(
            write_phantom(tmp_path / "ge", "g", vendor="GE", view="MLO", laterality="R")
        )
    )
    method = SpectralMethod(bank, references=2, allow_fewer=False, version="t")
    result = method(src.image, src.info)
    assert result.target_range == bank.stats().stored_range
    assert result.provenance.method == "spectral" and len(result.provenance.references) == 2
    assert (
        "method=spectral" in result.provenance.describe()
        and "gain 0.5-3" in result.provenance.describe()
    )
    mask = segment_breast(src.image, "MLO").mask
    pooled = pooled_breast_pixels(bank, result.provenance.references)
    assert np.array_equal(np.sort(result.image[mask]), target_quantiles(pooled, int(mask.sum())))
    assert np.all(result.image[~mask] == np.float32(bank.stats().background))
    assert np.array_equal(
        method(src.image, src.info).image, result.image
    )  # cached spectra, same output


def test_fingerprint_follows_settings_and_bank(tmp_path, bank):
    """Other settings or other references change the fingerprint (and so the output UIDs)."""
    method = SpectralMethod(bank, references=1, allow_fewer=False, version="t")
    before = method.fingerprint()
    assert SpectralMethod(bank, 1, False, "t", SpectralConfig(max_gain=2.0)).fingerprint() != before
    bank.remove(bank.entries()[0].sop_instance_uid)
    assert method.fingerprint() != before


def test_spectral_section_defaults_come_from_core():
    """[spectral] defaults are the core's SpectralConfig defaults, and core() round-trips them."""
    cfg = parse_config({}, environ={"MR2NST_SPECTRAL__MAX_GAIN": "4"})
    assert cfg.spectral.core() == SpectralConfig(max_gain=4.0)
    assert parse_config({}, environ={}).spectral.core() == SpectralConfig()


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ({"bogus": 1}, "spectral.bogus"),
        ({"max_gain": 0.5}, "spectral.max_gain"),
        ({"bins": "many"}, "spectral.bins"),
        ({"smooth_bins": 99}, "spectral.smooth_bins"),
        ({"low_cutoff": 0.6}, "spectral.low_cutoff"),
    ],
)
def test_bad_spectral_setting_names_the_key(section, key):
    """A bad key or value in [spectral] is a ConfigError naming spectral.<key>."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config({"spectral": section}, environ={})


def test_route_with_spectral_passes_check_methods():
    """A normalize route with method = "spectral" is valid and available in this build."""
    cfg = parse_config({"routes": [ROUTE], "destinations": CAD}, environ={})
    check_methods(cfg)
    assert cfg.routes[0].method == "spectral" and "spectral" in FACTORIES


def test_transfer_with_method_spectral(tmp_path, bank):
    """`mr2nst transfer --method spectral` writes a derived image saying method=spectral."""
    path = write_phantom(tmp_path / "ge", "g", vendor="GE", view="CC", laterality="L")
    cfg = parse_config(
        {"bank": {"path": str(bank.layout.root)}, "methods": {"references": 2}}, environ={}
    )
    [result] = run_transfer(cfg, [str(path)], tmp_path / "out", method="spectral")
    assert result["error"] == ""
    derived = pydicom.dcmread(result["output"])
    assert "method=spectral" in derived.DerivationDescription
    assert derived.BitsStored == bank.stats().bits_stored
