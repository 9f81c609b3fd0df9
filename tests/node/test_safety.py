"""Tests of the safety gate: faithful renderings pass, and each failure reason is caught alone."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from mr2nst.core.ehm import exact_histogram_match
from mr2nst.core.lab.phantom import PhantomSpec, make_case
from mr2nst.core.metrics import detect_spots
from mr2nst.core.segmentation import segment_breast
from mr2nst.node.config import SafetySection, parse_config
from mr2nst.node.errors import ConfigError, SafetyGateError
from mr2nst.node.service.safety import check_output, find_failures

SETTINGS = SafetySection()


@pytest.fixture(scope="module")
def case():
    """A small CC phantom with µCs."""
    return make_case(PhantomSpec(height=256, width=208, view="CC", laterality="L", seed=3))


@pytest.fixture(scope="module")
def source(case):
    """The GE rendering, as the pipeline hands it to the gate."""
    return case.ge


@pytest.fixture(scope="module")
def mask(source):
    """The source breast mask, as the gate segments it."""
    return segment_breast(source).mask


@pytest.fixture(scope="module")
def strong(source, mask):
    """The source spots the gate protects (the detector at the source's k)."""
    return detect_spots(source, mask, k=SETTINGS.spot_source_k)


def codes(source, output, settings=SETTINGS):
    """The codes of every check ``output`` fails."""
    return [failure.code for failure in find_failures(source, output, settings)]


def raised(source, output, settings=SETTINGS) -> SafetyGateError:
    """The error check_output raises (the test fails if it raises none)."""
    with pytest.raises(SafetyGateError) as info:
        check_output(source, output, settings)
    return info.value


def test_unchanged_image_passes(source):
    """The source itself, copied, passes every check."""
    check_output(source, source.copy(), SETTINGS)
    assert codes(source, source.copy()) == []


def test_histogram_matched_output_passes(case, source, mask):
    """EHM to the UIH rendering's breast histogram (a monotone remap) passes."""
    output = exact_histogram_match(source, mask, case.uih[case.mask], background=0.0)
    assert np.abs(output - source)[mask].mean() > 0.05  # a real change of tone
    check_output(source, output, SETTINGS)


def test_true_uih_rendering_passes(case, source):
    """The phantom's own UIH rendering (what a perfect normalization would give) passes."""
    check_output(source, case.uih, SETTINGS)


def test_wrong_shape_fails(source):
    """An output of another shape fails for its shape."""
    error = raised(source, source[:-1])
    assert error.code == "safety.shape"
    assert "(255, 208) != source (256, 208)" in error.detail


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_pixel_fails(source, value):
    """One NaN or infinite output pixel fails as non-finite."""
    output = source.copy()
    output[100, 100] = value
    error = raised(source, output)
    assert error.code == "safety.nonfinite"
    assert error.detail.startswith("1 non-finite output pixel(s)")


def test_shrunk_breast_fails(source, mask):
    """An output whose breast lost 3 px of skin line fails on mask overlap, and only on it."""
    kept = ndi.binary_erosion(mask, iterations=3, border_value=1)  # the chest wall stays
    output = np.where(kept, source, source.min()).astype(np.float32)
    assert codes(source, output) == ["safety.mask_overlap"]
    assert "breast mask IoU 0.9" in raised(source, output).detail


def test_grown_breast_fails(source, mask):
    """An output with 3 px of tissue painted around the breast fails on mask overlap alone."""
    output = source.copy()
    output[ndi.binary_dilation(mask, iterations=3) & ~mask] = np.median(source[mask])
    assert codes(source, output) == ["safety.mask_overlap"]


def test_uniform_output_has_no_breast(source):
    """A blank output fails mask overlap (no breast), spots and the constant check."""
    output = np.full_like(source, 0.5)
    assert codes(source, output) == ["safety.mask_overlap", "safety.spots", "safety.constant"]
    assert "no breast found in the output" in raised(source, output).detail


def test_smoothed_away_uc_fails(case, source, strong):
    """A µC inpainted by a local median fails on spots, and only on it."""
    protected = [(r, c, d) for r, c, d in case.calcs if strong[int(round(r)), int(round(c))]]
    assert protected, "the phantom has a µC the gate protects"
    row, col, diameter = protected[0]
    rr, cc = np.mgrid[: source.shape[0], : source.shape[1]]
    disk = np.hypot(rr - row, cc - col) <= diameter / 2 + 4
    output = source.copy()
    output[disk] = ndi.median_filter(source, size=11)[disk]
    assert codes(source, output) == ["safety.spots"]
    detail = raised(source, output).detail
    assert detail.startswith("1 of ") and "within 2 px" in detail


def test_spot_tolerance_is_honoured(source, mask, strong):
    """Spots moved 2 px pass at the default tolerance and fail at tolerance 0."""
    output = np.roll(source, 2, axis=0)
    assert "safety.spots" not in codes(source, output)
    assert "safety.spots" in codes(source, output, SafetySection(spot_tolerance_px=0.0))


def test_constant_patch_fails(source, mask, strong):
    """A flat 40x40 patch painted inside the breast fails as constant, and only as constant."""
    side = 40
    free = ndi.binary_erosion(mask, iterations=side) & ~ndi.binary_dilation(strong, iterations=side)
    rows, cols = np.nonzero(free)
    r0, c0 = int(rows[len(rows) // 2]) - side // 2, int(cols[len(cols) // 2]) - side // 2
    output = source.copy()
    output[r0 : r0 + side, c0 : c0 + side] = output[r0 : r0 + side, c0 : c0 + side].mean()
    assert codes(source, output) == ["safety.constant"]
    assert "32x32 px block" in raised(source, output).detail


def test_constant_where_the_source_is_constant_passes(source, mask):
    """A block flat in the source too (e.g. saturated) is not the method's fault."""
    flat_source, output = source.copy(), source.copy()
    rows, cols = np.nonzero(ndi.binary_erosion(mask, iterations=40))
    r0, c0 = int(rows[len(rows) // 2]), int(cols[len(cols) // 2])
    flat_source[r0 : r0 + 36, c0 : c0 + 36] = 0.9
    output[r0 : r0 + 36, c0 : c0 + 36] = 0.7
    assert "safety.constant" not in codes(flat_source, output)
    assert "safety.constant" in codes(source, output)


def test_disabled_gate_passes_anything(source):
    """With ``enabled = false`` not even a wrong shape or NaNs are refused."""
    off = SafetySection(enabled=False)
    check_output(source, source[:-1], off)
    check_output(source, np.full_like(source, np.nan), off)
    assert codes(source, np.full_like(source, np.nan), off) == ["safety.nonfinite"]


def test_spot_source_k_below_one_is_a_config_error():
    """``[safety] spot_source_k`` below 1 is refused at load, naming the key."""
    with pytest.raises(ConfigError, match="spot_source_k"):
        parse_config({"safety": {"spot_source_k": 0.5}}, environ={})


def test_source_spots_need_the_stronger_level(case, source):
    """At the detector's own k on both sides even the true UIH rendering fails (noise spots)."""
    assert codes(source, case.uih, SafetySection(spot_source_k=4.0)) == ["safety.spots"]
    assert codes(source, case.uih) == []
