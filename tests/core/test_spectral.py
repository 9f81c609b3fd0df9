"""Tests of the spectral match: EHM, then a clipped radial gain towards the references' spectrum."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from mr2nst.core.ehm import exact_histogram_match, target_quantiles
from mr2nst.core.errors import EngineConfigError, ImageError
from mr2nst.core.spectral import (
    SpectralConfig,
    bin_centres,
    gain_curve,
    log_gain,
    radial_power,
    spectral_match,
)

BAND = (0.1, 0.3)  # cycles/pixel: the texture band the blur removes


def texture(shape, seed):
    """Seeded 1/f noise plus small bright spots around 0.5: a sharp, mammogram-like texture."""
    rng = np.random.default_rng(seed)
    h, w = shape
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
    spectrum[0, 0] = 0.0
    image = np.fft.irfft2(spectrum, s=shape)
    image = (image - image.mean()) / image.std()
    spots = np.zeros(shape)
    at = rng.integers(0, [h, w], size=(h * w // 400, 2))
    spots[at[:, 0], at[:, 1]] = 1.0
    image += 30 * ndi.gaussian_filter(spots, 0.8)
    return (0.5 + 0.08 * image).astype(np.float32)


def half_ellipse(shape):
    """A breast-like mask: half an ellipse against the left (chest-wall) border."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return ((yy - h / 2) / (0.45 * h)) ** 2 + (xx / (0.85 * w)) ** 2 < 1


def band_energy(image, mask):
    """Breast power summed over BAND."""
    config = SpectralConfig()
    centres = bin_centres(config)
    return radial_power(image, mask, config)[(centres > BAND[0]) & (centres < BAND[1])].sum()


@pytest.fixture(scope="module")
def blurred_pair():
    """(reference, its mask, the EHM-matched Gaussian-blurred reference as the source)."""
    ref = texture((256, 200), 1)
    mask = half_ellipse(ref.shape)
    source = ndi.gaussian_filter(ref, 1.5).astype(np.float32)
    matched = exact_histogram_match(source, mask, ref[mask], background=0.0)
    return ref, mask, source, matched


def test_blurred_source_gets_the_references_texture_back(blurred_pair):
    """A blurred source's texture energy moves from <0.6 to 0.7-1.3 of the reference's."""
    ref, mask, source, matched = blurred_pair
    want = band_energy(ref, mask)
    assert band_energy(source, mask) / want < 0.5
    assert band_energy(matched, mask) / want < 0.6  # EHM alone does not restore the texture
    out = spectral_match(matched, mask, [(ref, mask)], background=0.0).image
    assert 0.7 < band_energy(out, mask) / want < 1.3


def test_output_histogram_equals_target_exactly(blurred_pair):
    """Inside the mask: the pooled reference pixels' distribution; outside: the background."""
    ref, mask, _, matched = blurred_pair
    other = texture((180, 240), 2)
    other_mask = half_ellipse(other.shape)
    out = spectral_match(matched, mask, [(ref, mask), (other, other_mask)], background=0.25).image
    pooled = np.concatenate([ref[mask], other[other_mask]])
    assert np.array_equal(np.sort(out[mask]), target_quantiles(pooled, int(mask.sum())))
    assert np.all(out[~mask] == np.float32(0.25))


def test_gain_is_one_at_and_below_the_low_cutoff(blurred_pair):
    """Tone and anatomy stay: the gain is exactly 1 up to low_cutoff, bins and curve alike."""
    ref, mask, _, matched = blurred_pair
    config = SpectralConfig(low_cutoff=0.05)
    result = spectral_match(matched, mask, [(ref, mask)], config)
    assert np.all(result.gain[result.frequencies <= 0.05] == 1.0)
    assert np.any(result.gain[result.frequencies > 0.1] > 1.5)
    gains = log_gain(result.source_power, result.reference_power, config)
    assert np.all(gain_curve(np.linspace(0.0, 0.05, 11), gains, config) == 1.0)


def test_gains_are_clipped():
    """Huge or tiny power ratios give gains within [min_gain, max_gain]."""
    config = SpectralConfig(min_gain=0.8, max_gain=1.5, smooth_bins=0)
    source = np.where(np.arange(config.bins) % 2 == 0, 1e-6, 1e6)
    gains = np.exp(log_gain(source, np.ones(config.bins), config))
    assert gains.max() == pytest.approx(1.5) and gains.min() == pytest.approx(0.8)
    curve = gain_curve(np.linspace(0, 0.7, 200), np.log(gains), config)
    assert curve.max() <= 1.5 + 1e-9 and curve.min() >= 0.8 - 1e-9


def test_non_square_and_different_shape_references_work():
    """A wide source with tall, differently sized references keeps its shape and matches."""
    source = ndi.gaussian_filter(texture((150, 260), 3), 1.0).astype(np.float32)
    mask = half_ellipse(source.shape)
    refs = [
        (texture(shape, 10 + i), half_ellipse(shape))
        for i, shape in enumerate([(300, 170), (97, 131)])
    ]
    result = spectral_match(source, mask, refs, background=0.0)
    assert result.image.shape == source.shape and np.isfinite(result.image).all()
    pooled = np.concatenate([r[m] for r, m in refs])
    assert np.array_equal(np.sort(result.image[mask]), target_quantiles(pooled, int(mask.sum())))
    assert result.gain.shape == result.frequencies.shape == (SpectralConfig().bins,)


def test_spectrum_compares_across_shapes():
    """The same texture measured on two image shapes gives about the same radial power."""
    big = texture((320, 320), 4)
    small = big[40:240, 30:280]
    a = radial_power(big, half_ellipse(big.shape))
    b = radial_power(small, half_ellipse(small.shape))
    band = bin_centres(SpectralConfig()) > 0.05
    assert np.all(np.abs(np.log(a[band] / b[band])) < np.log(1.5))


def test_deterministic(blurred_pair):
    """The same inputs give bit-identical outputs."""
    ref, mask, _, matched = blurred_pair
    first = spectral_match(matched, mask, [(ref, mask)]).image
    assert np.array_equal(first, spectral_match(matched, mask, [(ref, mask)]).image)


def test_empty_mask_is_an_image_error(blurred_pair):
    """An empty source mask (no breast) raises ImageError, as does an empty reference mask."""
    ref, mask, _, matched = blurred_pair
    with pytest.raises(ImageError, match="empty"):
        spectral_match(matched, np.zeros_like(mask), [(ref, mask)])
    with pytest.raises(ImageError, match="empty"):
        spectral_match(matched, mask, [(ref, np.zeros_like(mask))])
    with pytest.raises(ImageError, match="references"):
        spectral_match(matched, mask, [])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("bins", 2),
        ("min_gain", 0.0),
        ("max_gain", 0.9),
        ("low_cutoff", 0.5),
        ("fill_sigma", 0),
        ("iterations", 0),
    ],
)
def test_bad_settings_name_the_key(key, value):
    """An out-of-range setting raises EngineConfigError naming spectral.<key>."""
    with pytest.raises(EngineConfigError, match=f"spectral.{key}"):
        SpectralConfig(**{key: value})
