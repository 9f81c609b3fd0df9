"""Tests of the `ehm` method: the node's GE image to the bank's UIH histogram."""

import numpy as np
import pydicom
import pytest
from support import write_phantom

from mr2nst.bank.bank import Bank
from mr2nst.bank.errors import NotEnoughReferences
from mr2nst.bank.manifest import UNIT_SCALE
from mr2nst.core.ehm import target_quantiles
from mr2nst.core.segmentation import segment_breast
from mr2nst.node.config import parse_config
from mr2nst.node.dicom.pixels import decode, decode_stored
from mr2nst.node.methods.ehm import EhmMethod
from mr2nst.node.methods.registry import MethodCache
from mr2nst.node.service.pipeline import Pipeline


def pooled_breast_pixels(bank, uids) -> np.ndarray:
    """The breast pixels of the bank references ``uids``, pooled, as the methods read them."""
    entries = {e.sop_instance_uid: e for e in bank.entries()}
    pixels = []
    for uid in uids:
        image = np.asarray(bank.layout.load_image(entries[uid]), dtype=np.float32)
        pixels.append((image / np.float32(UNIT_SCALE))[bank.layout.load_mask(entries[uid])])
    return np.concatenate(pixels)


def test_breast_gets_the_references_histogram(tmp_path, bank):
    """Inside the breast the output equals the pooled reference distribution exactly."""
    src = decode(
        pydicom.dcmread(
            write_phantom(tmp_path / "ge", "g", vendor="GE", view="MLO", laterality="R")
        )
    )
    method = EhmMethod(bank, references=3, allow_fewer=False, version="t")
    result = method(src.image, src.info)
    refs = result.provenance.references
    assert len(refs) == 3
    entries = {e.sop_instance_uid: e for e in bank.entries()}
    assert all(entries[uid].view == "MLO" for uid in refs)
    mask = segment_breast(src.image, "MLO").mask
    pooled = pooled_breast_pixels(bank, refs)
    assert np.array_equal(np.sort(result.image[mask]), target_quantiles(pooled, int(mask.sum())))
    assert np.all(result.image[~mask] == np.float32(bank.stats().background))
    assert result.target_range.bits_stored == bank.stats().bits_stored


def test_fingerprint_follows_bank_content(tmp_path, bank):
    """Changing the references changes the fingerprint (and so the output UIDs)."""
    method = EhmMethod(bank, references=1, allow_fewer=False, version="t")
    before = method.fingerprint()
    bank.remove(bank.entries()[0].sop_instance_uid)
    assert method.fingerprint() != before


def test_derived_is_in_target_bit_depth_and_source_photometric(tmp_path, bank):
    """The derived image has the bank's bit depth and the source's photometric interpretation."""
    path = write_phantom(tmp_path / "ge", "g", vendor="GE", bits=12, photometric="MONOCHROME2")
    cfg = parse_config(
        {"bank": {"path": str(bank.layout.root)}, "methods": {"references": 2}}, environ={}
    )
    derived = Pipeline(cfg, MethodCache(cfg)).derive(pydicom.dcmread(path), "ehm")
    assert derived.BitsStored == bank.stats().bits_stored == 14
    assert derived.PhotometricInterpretation == "MONOCHROME2"
    assert (
        "method=ehm" in derived.DerivationDescription
        and "references=2" in derived.DerivationDescription
    )
    assert decode_stored(derived).max() <= 2**14 - 1


def test_too_few_references_is_reported(tmp_path):
    """A bank without the source's view gives NotEnoughReferences (permanent for a worker)."""
    bank = Bank(tmp_path / "bank")
    bank.add([write_phantom(tmp_path / "uih", "only-cc", view="CC")])
    src = decode(pydicom.dcmread(write_phantom(tmp_path / "ge", "g", vendor="GE", view="MLO")))
    with pytest.raises(NotEnoughReferences, match="MLO"):
        EhmMethod(bank, references=1, allow_fewer=True, version="t")(src.image, src.info)
