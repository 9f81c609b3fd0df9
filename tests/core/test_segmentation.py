"""Tests of breast segmentation on phantom images."""

import numpy as np
import pytest

from mr2nst.core.errors import ImageError
from mr2nst.core.lab.phantom import PhantomSpec, make_case
from mr2nst.core.segmentation import segment_breast


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("view", ["CC", "MLO"])
@pytest.mark.parametrize("laterality", ["L", "R"])
def test_mask_matches_ground_truth(view, laterality):
    """The mask overlaps the phantom's true breast closely in both vendor renderings."""
    case = make_case(PhantomSpec(height=512, width=424, view=view, laterality=laterality, seed=2))
    for image in (case.ge, case.uih):
        seg = segment_breast(image, view)
        assert iou(seg.mask, case.mask) > 0.95
        assert seg.chest_wall_left == (laterality == "L")


def test_pectoral_only_on_mlo():
    """MLO gets a pectoral region in the upper chest-wall corner; CC gets none."""
    mlo = make_case(PhantomSpec(height=512, width=424, view="MLO", laterality="L", seed=4))
    seg = segment_breast(mlo.uih, "MLO")
    assert 0.02 < seg.pectoral.mean() < 0.3
    rows, cols = np.nonzero(seg.pectoral)
    assert rows.mean() < 512 / 2 and cols.mean() < 424 / 2
    assert seg.breast.sum() < seg.mask.sum()
    cc = make_case(PhantomSpec(height=512, width=424, view="CC", seed=4))
    assert not segment_breast(cc.uih, "CC").pectoral.any()


def test_labels_outside_the_breast_are_ignored():
    """A bright marker in the background is not part of the breast."""
    case = make_case(PhantomSpec(height=512, width=424, view="CC", laterality="L", seed=1))
    image = case.ge.copy()
    image[10:40, 380:415] = 1.0  # a lead marker in the far corner
    seg = segment_breast(image, "CC")
    assert not seg.mask[10:40, 380:415].any()


def test_area_in_mm2_uses_spacing():
    """Breast area scales with the pixel spacing."""
    case = make_case(PhantomSpec(height=256, width=208, seed=3))
    seg = segment_breast(case.ge, "CC")
    assert seg.area_mm2((0.2, 0.2)) == pytest.approx(4 * seg.area_mm2((0.1, 0.1)))


def test_uniform_image_is_rejected():
    """An image with no breast raises ImageError."""
    with pytest.raises(ImageError, match="no breast"):
        segment_breast(np.full((64, 64), 0.3, dtype=np.float32))
