"""Tests of the synthetic paired mammogram phantom (mr2nst.core.lab.phantom)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.exposure import match_histograms

from mr2nst.core.errors import ImageError
from mr2nst.core.lab.phantom import PhantomCase, PhantomSpec, make_case, render_ge, render_uih
from mr2nst.core.lab.phantom_render import powerlaw_noise

H, W = 256, 208


def small(**kw: object) -> PhantomSpec:
    return PhantomSpec(height=H, width=W, **kw)  # type: ignore[arg-type]


def high_freq_energy(img: np.ndarray, mask: np.ndarray) -> float:
    return float(((img - ndi.gaussian_filter(img, 2.0))[mask] ** 2).mean())


def calc_contrast(img: np.ndarray, calcs: np.ndarray) -> np.ndarray:
    """Value at each µC minus the 7x7 median around it (robust to texture gradients)."""
    background = ndi.median_filter(img, size=7)
    rows = np.rint(calcs[:, 0]).astype(int)
    cols = np.rint(calcs[:, 1]).astype(int)
    return (img - background)[rows, cols]


@pytest.fixture(scope="module", params=[("CC", "L", 0), ("MLO", "R", 1), ("MLO", "L", 2)])
def case(request: pytest.FixtureRequest) -> PhantomCase:
    view, lat, seed = request.param
    return make_case(small(view=view, laterality=lat, seed=seed))


def test_same_seed_same_case_different_seed_differs() -> None:
    """make_case is deterministic per seed and varies with it."""
    a, b = make_case(small(seed=7)), make_case(small(seed=7))
    for name in ("density", "ge", "uih", "mask", "calcs", "masses"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = make_case(small(seed=8))
    assert not np.array_equal(a.density, c.density)
    assert not np.array_equal(a.ge, c.ge)


def test_shapes_dtypes_and_ranges(case: PhantomCase) -> None:
    """Images are HxW float32 in [0, 1]; the mask is bool; truth arrays are (N, 3)."""
    for img in (case.density, case.ge, case.uih):
        assert img.shape == (H, W)
        assert img.dtype == np.float32
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert case.mask.shape == (H, W) and case.mask.dtype == np.bool_
    assert case.calcs.ndim == 2 and case.calcs.shape[1] == 3 and len(case.calcs) >= 4
    assert case.masses.shape == (2, 3)


def test_mask_is_a_plausible_breast(case: PhantomCase) -> None:
    """The breast covers a good part of the image and sits on the chest-wall edge."""
    frac = float(case.mask.mean())
    assert 0.3 < frac < 0.8
    chest, far = (0, -1) if case.spec.laterality == "L" else (-1, 0)
    assert case.mask[:, chest].mean() > 0.6
    assert case.mask[:, far].mean() < 0.05
    assert ndi.label(case.mask)[1] == 1  # one connected region
    assert float(case.density[~case.mask].max()) == 0.0
    assert float(case.density[case.mask].mean()) > 0.2


def test_backgrounds_are_low_and_differ_between_vendors(case: PhantomCase) -> None:
    """Outside the breast both renderings are dark with a little noise, at vendor levels."""
    bg_ge = case.ge[~case.mask]
    bg_uih = case.uih[~case.mask]
    assert float(bg_ge.mean()) < 0.1 and float(bg_uih.mean()) < 0.1
    assert float(bg_ge.std()) > 0.0
    assert abs(float(bg_ge.mean()) - float(bg_uih.mean())) > 0.02


def test_calcs_lie_in_the_breast_and_are_visible_in_both_styles(case: PhantomCase) -> None:
    """Every µC is 1-4 px, inside the mask, brighter than its surroundings, more so in UIH."""
    rows = np.rint(case.calcs[:, 0]).astype(int)
    cols = np.rint(case.calcs[:, 1]).astype(int)
    assert case.mask[rows, cols].all()
    assert ((case.calcs[:, 2] >= 1.0) & (case.calcs[:, 2] <= 4.0)).all()
    ge = calc_contrast(case.ge, case.calcs)
    uih = calc_contrast(case.uih, case.calcs)
    assert (ge > 0).all()
    assert (uih > 0).all()
    assert float(np.median(uih)) > float(np.median(ge))


def test_masses_lie_in_the_breast(case: PhantomCase) -> None:
    """Mass centres are inside the mask and have a positive radius."""
    rows = np.rint(case.masses[:, 0]).astype(int)
    cols = np.rint(case.masses[:, 1]).astype(int)
    assert case.mask[rows, cols].all()
    assert (case.masses[:, 2] > 0).all()


def test_uih_is_sharper_than_ge_even_after_histogram_matching(case: PhantomCase) -> None:
    """UIH has more high-frequency energy, and matching GE's histogram to UIH does not close it."""
    m = case.mask
    ge, uih = high_freq_energy(case.ge, m), high_freq_energy(case.uih, m)
    assert uih > 2.0 * ge
    matched = match_histograms(case.ge, case.uih)
    assert high_freq_energy(matched, m) < 0.8 * uih
    assert float(case.uih[m].std()) > float(case.ge[m].std())  # more contrast too


def test_pectoral_muscle_only_on_mlo() -> None:
    """The top chest-wall corner is dense muscle on MLO and (nearly) empty on CC."""
    corner = (slice(0, H // 8), slice(0, W // 8))
    for seed in range(3):
        cc = make_case(small(view="CC", seed=seed))
        mlo = make_case(small(view="MLO", seed=seed))
        assert float(mlo.density[corner].mean()) > 0.5
        assert float(cc.density[corner].mean()) < 0.3
        assert mlo.mask[corner].all()


def test_right_breast_mirrors_left() -> None:
    """Laterality R is the exact column mirror of L, ground truth included."""
    left = make_case(small(view="MLO", laterality="L", seed=3))
    right = make_case(small(view="MLO", laterality="R", seed=3))
    for name in ("density", "ge", "uih", "mask"):
        np.testing.assert_array_equal(getattr(right, name), getattr(left, name)[:, ::-1])
    np.testing.assert_allclose(right.calcs[:, 1], (W - 1) - left.calcs[:, 1])
    np.testing.assert_array_equal(right.calcs[:, [0, 2]], left.calcs[:, [0, 2]])
    np.testing.assert_allclose(right.masses[:, 1], (W - 1) - left.masses[:, 1])


def test_powerlaw_noise_has_the_requested_slope() -> None:
    """The radially averaged power spectrum of 1/f^3 noise falls with a slope near -3."""
    field = powerlaw_noise((256, 256), 3.0, 0)
    assert field.dtype == np.float32
    assert abs(float(field.mean())) < 1e-4 and abs(float(field.std()) - 1.0) < 1e-3
    power = np.abs(np.fft.fft2(field)) ** 2
    fy, fx = np.meshgrid(np.fft.fftfreq(256), np.fft.fftfreq(256), indexing="ij")
    f = np.hypot(fy, fx)
    band = (f > 0.02) & (f < 0.3)
    slope = np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0]
    assert -3.4 < slope < -2.6


def test_renderers_are_deterministic_for_seed_or_generator() -> None:
    """render_ge/render_uih give the same image for equal seeds or equally seeded generators."""
    case = make_case(small(seed=4))
    a = render_ge(case.density, case.mask, 11)
    b = render_ge(case.density, case.mask, np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    u1 = render_uih(case.density, case.mask, 5)
    u2 = render_uih(case.density, case.mask, 5)
    np.testing.assert_array_equal(u1, u2)
    assert not np.array_equal(a, render_ge(case.density, case.mask, 12))


@pytest.mark.parametrize(
    "kw",
    [
        {"view": "ML"},
        {"laterality": "B"},
        {"height": 10},
        {"n_masses": -1},
        {"pixel_spacing_mm": 0},
    ],
)
def test_invalid_spec_is_rejected(kw: dict[str, object]) -> None:
    """PhantomSpec refuses an unknown view or laterality, tiny sizes and negative counts."""
    with pytest.raises(ImageError):
        PhantomSpec(**kw)  # type: ignore[arg-type]


def test_renderer_rejects_mismatched_mask() -> None:
    """A mask that does not match the density's shape is an ImageError."""
    with pytest.raises(ImageError):
        render_ge(np.zeros((8, 8), np.float32), np.zeros((8, 9), bool), 0)
