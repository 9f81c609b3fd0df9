"""Tests of the `mr2nst` method in the node (tiny engine settings, seeded-random features)."""

import numpy as np
import pydicom
import pytest
from support import uih_bank_files, write_phantom

from mr2nst.bank.bank import Bank
from mr2nst.core.intensity import robust_unit
from mr2nst.node.config import parse_config
from mr2nst.node.dicom.pixels import decode
from mr2nst.node.methods.registry import MethodCache
from mr2nst.node.service.pipeline import Pipeline

TINY = {
    "features": "seeded-random",
    "patch_size": 32,
    "grids": [1, 2],
    "iterations": 2,
}


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    root = tmp_path_factory.mktemp("mr2nst")
    bank = Bank(root / "bank")
    bank.add([uih_bank_files(root / "uih", per_view_side=1)])
    return bank


def config(bank, **engine):
    return parse_config(
        {
            "bank": {"path": str(bank.layout.root), "allow_fewer": True},
            "engine": {**TINY, **engine},
            "methods": {"references": 2},
        },
        environ={},
    )


def test_robust_unit_spans_the_breast():
    """Robust scaling maps the breast's 0.5-99.5 percentiles to 0 and 1 and clips the rest."""
    image = np.linspace(0, 1, 10000, dtype=np.float32).reshape(100, 100)
    mask = np.zeros_like(image, dtype=bool)
    mask[20:80] = True
    out = robust_unit(image, mask)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.percentile(out[mask], 50) == pytest.approx(0.5, abs=0.02)


def test_transfer_result_is_in_the_target_domain(tmp_path, bank):
    """tone = "linear": the output spans the bank's robust range and records how it was made."""
    cfg = config(bank, tone="linear")
    method = MethodCache(cfg).get("mr2nst")
    src = decode(
        pydicom.dcmread(write_phantom(tmp_path, "g", vendor="GE", view="CC", laterality="R"))
    )
    result = method(src.image, src.info)
    stats = bank.stats()
    assert result.image.shape == src.image.shape and result.target_range == stats.stored_range
    assert np.isclose(result.image.min(), stats.background, atol=1e-6)
    assert result.image.max() <= stats.high + 1e-6
    assert method.last is None  # a node's method keeps no job's images after the job
    prov = result.provenance
    assert (
        prov.method == "mr2nst"
        and prov.scales == (1, 2)
        and prov.features == "seeded-random:seed=0"
    )
    views = {e.sop_instance_uid: e.view for e in bank.entries()}
    assert len(prov.references) == 2 and {views[uid] for uid in prov.references} == {"CC"}
    described = prov.describe()
    assert "seeded-random" in described and "refiner untrained" in described


def test_derived_dataset_says_seeded_random(tmp_path, bank):
    """A derived instance made with seeded-random features says so in DerivationDescription."""
    cfg = config(bank, init="ehm")
    src = pydicom.dcmread(write_phantom(tmp_path, "g", vendor="GE", view="MLO"))
    derived = Pipeline(cfg, MethodCache(cfg)).derive(src, "mr2nst")
    assert "features=seeded-random" in derived.DerivationDescription
    assert (
        "init ehm" in derived.DerivationDescription
        and derived.BitsStored == bank.stats().bits_stored
    )


def test_fingerprint_changes_with_engine_settings(bank):
    """Different engine settings give a different fingerprint (so different output UIDs)."""
    a = MethodCache(config(bank)).get("mr2nst").fingerprint()
    b = MethodCache(config(bank, iterations=3)).get("mr2nst").fingerprint()
    assert a != b


def test_tone_ehm_gives_the_references_breast_histogram_exactly(tmp_path, bank):
    """tone = "ehm": the breast pixels are exactly the references' pooled breast quantiles."""
    from mr2nst.core.ehm import target_quantiles
    from mr2nst.node.methods.references import breast_area

    cfg = config(bank, tone="ehm", merge="bands", content_layers=["relu1_1", "relu4_2"])
    method = MethodCache(cfg).get("mr2nst")
    src = decode(
        pydicom.dcmread(write_phantom(tmp_path, "g", vendor="GE", view="CC", laterality="R"))
    )
    result = method(src.image, src.info)
    mask, area, chest_left = breast_area(src.image, src.info)
    refs = bank.select("CC", "R", area, 2, chest_wall_left=chest_left, allow_fewer=True)
    pooled = np.concatenate([r.image[r.mask] for r in refs])
    expected = target_quantiles(pooled, int(mask.sum()))
    assert np.array_equal(np.sort(result.image[mask]), np.sort(expected))
    assert (
        "tone ehm" in result.provenance.describe() and "merge bands" in result.provenance.describe()
    )
    linear = MethodCache(config(bank, tone="linear")).get("mr2nst")(src.image, src.info)
    assert not np.array_equal(np.sort(linear.image[mask]), np.sort(expected))
