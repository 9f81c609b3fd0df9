"""Tests of the evaluation metrics on constructed cases whose answer is known."""

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from mr2nst.core import metrics as m
from mr2nst.core.features import build_features
from mr2nst.core.lab.phantom import PhantomSpec, make_case


@pytest.fixture(scope="module")
def case():
    return make_case(
        PhantomSpec(height=160, width=128, view="CC", laterality="L", seed=3, n_clusters=3)
    )


@pytest.fixture(scope="module")
def features():
    return build_features("seeded-random", "max", seed=1)


def test_identical_images_score_perfectly(case):
    """An image compared with itself: SSIM 1, PSNR infinite, CNR ratio 1, W1 0."""
    img, mask = case.uih, case.mask
    assert m.masked_ssim(img, img, mask) == pytest.approx(1.0)
    assert m.masked_psnr(img, img, mask) == math.inf
    assert m.uc_cnr_ratio(img, img, case.calcs) == pytest.approx(1.0)
    assert m.hist_w1(img, mask, img[mask]) == pytest.approx(0.0, abs=1e-12)


def test_identical_grams_have_zero_distance(case, features):
    """The Gram distance of an image to its own Grams is 0, to another style's it is positive."""
    own = m.masked_grams(features, case.uih, case.mask)
    other = m.masked_grams(features, case.ge, case.mask)
    assert m.gram_distance(own, own) == 0.0
    assert m.gram_distance(other, own) > 0.01
    assert set(own) == {"relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"}


def test_empty_mask_cannot_be_scored(case, features):
    """An empty mask gives None, not a made-up number."""
    empty = np.zeros_like(case.mask)
    assert m.masked_grams(features, case.uih, empty) is None
    assert m.masked_ssim(case.uih, case.ge, empty) is None
    assert m.masked_psnr(case.uih, case.ge, empty) is None
    assert m.hist_w1(case.uih, empty, case.uih.ravel()) is None


def test_pure_histogram_shift_is_the_w1_distance(case):
    """Adding a constant c inside the mask moves W1 by exactly c and lowers PSNR to -20log10(c)."""
    img, mask = case.uih, case.mask
    shifted = img.astype(np.float64) + 0.05 * mask
    assert m.hist_w1(shifted, mask, img[mask]) == pytest.approx(0.05, rel=1e-6)
    assert m.masked_psnr(shifted, img, mask) == pytest.approx(-20 * np.log10(0.05), rel=1e-6)


def test_monotone_remap_keeps_uc_cnr_direction_but_changes_histogram(case):
    """A gamma remap changes the histogram distance but keeps µCs brighter than their surround."""
    img, mask = case.uih, case.mask
    remapped = np.power(img, 0.6)
    assert m.hist_w1(remapped, mask, img[mask]) > 0.05
    assert m.uc_cnr_ratio(remapped, img, case.calcs) > 0.5


def test_blurred_image_loses_uc_cnr_and_detections(case):
    """Blurring the true rendering lowers the µC CNR ratio and the fraction of detected µCs."""
    img, mask = case.uih, case.mask
    blurred = ndi.gaussian_filter(img, 1.5)
    assert m.uc_cnr_ratio(blurred, img, case.calcs) < 0.7
    heavily = ndi.gaussian_filter(img, 3.0)
    assert m.uc_detected(img, mask, case.calcs) >= 0.7
    assert m.uc_detected(heavily, mask, case.calcs) < 0.5 * m.uc_detected(img, mask, case.calcs)


def test_spot_detector_is_quiet_on_noise_only():
    """On white noise the fixed detector fires on very few pixels."""
    gen = np.random.default_rng(0)
    noise = 0.5 + 0.01 * gen.standard_normal((128, 128))
    mask = np.ones_like(noise, dtype=bool)
    assert m.detect_spots(noise, mask).mean() < 0.01


def test_no_calcs_gives_none(case):
    """Without known µCs the µC metrics are None."""
    none = np.zeros((0, 3))
    assert m.uc_detected(case.uih, case.mask, none) is None
    assert m.uc_cnr_ratio(case.uih, case.uih, none) is None


def test_summary_and_paired_test():
    """Summary drops None and non-finite values; the paired test needs two varying pairs."""
    s = m.summary([1.0, None, 3.0, math.inf])
    assert s is not None and (s.mean, s.n) == (2.0, 2) and s.sd == pytest.approx(math.sqrt(2))
    assert m.summary([None]) is None
    assert m.paired_p([1.0, 2.0], [1.0, None]) is None
    assert m.paired_p([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) is None  # constant difference: t undefined
    p = m.paired_p([1.0, 2.1, 2.9, 4.2], [2.0, 3.0, 4.1, 5.0])
    assert p is not None and 0.0 < p < 0.01


def test_sharpness_ratio_orders_blurred_original_and_sharpened(case):
    """Against the original: itself scores 1, a blurred copy below 1, a sharpened one above."""
    img, mask = case.uih.astype(np.float64), case.mask
    blurred = ndi.gaussian_filter(img, 1.0)
    sharpened = img + 1.0 * (img - ndi.gaussian_filter(img, 1.0))
    assert m.sharpness_ratio(img, img, mask) == pytest.approx(1.0)
    assert m.sharpness_ratio(blurred, img, mask) < 0.8
    assert m.sharpness_ratio(sharpened, img, mask) > 1.3


def test_identical_images_have_perfect_texture_scores(case):
    """An image against itself: structure SSIM 1, spectrum distance 0 to its own spectrum."""
    img, mask = case.uih, case.mask
    own = m.radial_spectrum(img, mask)
    assert own is not None and own.shape == (len(m.SPECTRUM_BINS) - 1,)
    assert m.structure_ssim(img, img, mask) == pytest.approx(1.0)
    assert m.spectrum_dist(img, mask, own) == pytest.approx(0.0, abs=1e-12)
    assert m.spectrum_dist(img, mask, m.mean_spectrum([own, own])) == pytest.approx(0.0, abs=1e-12)


def test_structure_ssim_ignores_independent_noise_grain(case):
    """White noise (sd 0.05) lowers plain SSIM clearly but leaves the low-passed SSIM near 1."""
    img, mask = case.uih.astype(np.float64), case.mask
    noisy = img + 0.05 * np.random.default_rng(0).standard_normal(img.shape)
    plain, structure = m.masked_ssim(noisy, img, mask), m.structure_ssim(noisy, img, mask)
    assert plain < 0.85
    assert structure > 0.95 and structure > plain + 0.1


def test_blurred_texture_is_far_from_the_sharp_spectrum(case):
    """Against the sharp image's spectrum, a blurred copy is further away than the image itself."""
    img, mask = case.uih.astype(np.float64), case.mask
    target = m.radial_spectrum(img, mask)
    blurred = ndi.gaussian_filter(img, 1.0)
    assert m.spectrum_dist(blurred, mask, target) > 0.3 > m.spectrum_dist(img, mask, target)


def test_empty_mask_gives_no_texture_scores(case):
    """An empty mask gives None for the spectrum, sharpness and structure SSIM."""
    empty = np.zeros_like(case.mask)
    assert m.radial_spectrum(case.uih, empty) is None
    assert m.spectrum_dist(case.uih, empty, np.zeros(len(m.SPECTRUM_BINS) - 1)) is None
    assert m.sharpness_ratio(case.ge, case.uih, empty) is None
    assert m.structure_ssim(case.ge, case.uih, empty) is None


def test_metric_network_is_never_the_engines():
    """hed-vgg16 engines are scored by seeded VGG19 (7919, or 7920), others by hed-vgg16."""
    assert m.metric_network("hed-vgg16", 0) == ("seeded-random", 7919)
    assert m.metric_network("hed-vgg16", 7919) == ("seeded-random", 7920)
    assert m.metric_network("imagenet", 0)[0] == "hed-vgg16"
    assert m.metric_network("seeded-random", 7919)[0] == "hed-vgg16"
