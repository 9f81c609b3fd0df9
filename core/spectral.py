"""Spectral matching: EHM, then the breast's radial power spectrum matched to the references'.

A strong non-neural competitor to mr2NST that needs no GPU. After exact histogram
matching (:mod:`.ehm`), the source still has its own texture: a GE image is usually
smoother (or sharper) than a UIH one at the same intensities. This module measures the
radially averaged power spectrum of the breast, P(f), on a fixed grid of frequencies in
cycles/pixel (so images of different shapes compare), and filters the source with the
radially symmetric gain

    g(f) = sqrt(P_references(f) / P_source(f)),

smoothed across bins (in log), clipped to [min_gain, max_gain] and held at exactly 1 at
and below ``low_cutoff`` (tone and anatomy stay; only texture bands change). The
filtered breast is then given the references' pooled histogram exactly again, so the
output's histogram inside the mask equals EHM's.

Breast boundary: outside the mask, the image is replaced by a smooth extension of the
breast (normalised convolution: the Gaussian-blurred breast divided by the blurred mask,
fading to the breast mean far away), so the skin line is not a step that would dominate
the spectrum. The spectrum is estimated on that filled image, less the breast mean,
under a separable Tukey window, and normalised by the window's energy over the breast,
so breasts of different sizes compare. The filter is applied to the filled image with
reflect padding, so the chest wall at the image border does not ring.

Pure numpy/scipy, deterministic, any 2-D shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
from scipy import fft as sfft  # type: ignore[import-untyped, unused-ignore]
from scipy import ndimage as ndi  # type: ignore[import-untyped, unused-ignore]
from scipy.signal import windows  # type: ignore[import-untyped, unused-ignore]

from .ehm import BoolImage, exact_histogram_match, target_quantiles
from .errors import EngineConfigError, ImageError
from .intensity import FloatImage

FloatArray = npt.NDArray[np.float64]

#: Fraction of each image side tapered by the Tukey window of the spectrum estimate.
TAPER = 0.2
#: Reflect padding (pixels) around the filled image when the gain filter is applied.
PAD = 32
#: The fill's normalised convolution fades to the breast mean where the blurred mask is
#: below about this value.
FILL_EPS = 1e-3


@dataclass(frozen=True)
class SpectralConfig:
    """Settings of the spectral match; validated on construction (errors name the setting)."""

    bins: int = 32  # frequency bins, evenly spaced from 0 to 0.5 cycles/pixel
    min_gain: float = 0.5
    max_gain: float = 3.0
    low_cutoff: float = 0.02  # cycles/pixel; the gain is exactly 1 at and below it
    smooth_bins: float = 1.0  # Gaussian sigma (in bins) of the log-gain smoothing; 0 = none
    fill_sigma: float = 16.0  # pixels; Gaussian of the smooth extension outside the breast
    iterations: int = 2  # filter + histogram passes; each later pass corrects the gain

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> EngineConfigError:
            return EngineConfigError(f"spectral.{name}: {why}, got {getattr(self, name)!r}")

        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 4:
            raise bad("bins", "must be an integer >= 4")
        if not 0.0 < self.min_gain <= 1.0:
            raise bad("min_gain", "must be in (0, 1]")
        if not 1.0 <= self.max_gain <= 100.0:
            raise bad("max_gain", "must be in [1, 100]")
        if not 0.0 <= self.low_cutoff < 0.5:
            raise bad("low_cutoff", "must be in [0, 0.5) cycles/pixel")
        if not 0.0 <= self.smooth_bins <= self.bins:
            raise bad("smooth_bins", "must be in [0, bins]")
        if not 0.0 < self.fill_sigma <= 1024.0:
            raise bad("fill_sigma", "must be in (0, 1024] pixels")
        if (
            isinstance(self.iterations, bool)
            or not isinstance(self.iterations, int)
            or not 1 <= self.iterations <= 8
        ):
            raise bad("iterations", "must be an integer in 1..8")

    def describe(self) -> str:
        """A short, stable id of the settings (for fingerprints and provenance)."""
        return "spectral " + ",".join(f"{k}={v:g}" for k, v in asdict(self).items())


@dataclass(frozen=True)
class SpectralResult:
    """The output image and what the match measured (per frequency bin)."""

    image: FloatImage
    frequencies: FloatArray  # bin centres, cycles/pixel
    source_power: FloatArray  # of the input (EHM-matched) image
    reference_power: FloatArray  # mean over the references
    gain: FloatArray  # the applied amplitude gain at the bin centres


def bin_centres(config: SpectralConfig) -> FloatArray:
    """Centres of the frequency bins (cycles/pixel)."""
    edges = np.linspace(0.0, 0.5, config.bins + 1)
    return np.asarray((edges[:-1] + edges[1:]) / 2, dtype=np.float64)


def _radial_frequency(shape: tuple[int, int]) -> FloatArray:
    """|f| in cycles/pixel of every coefficient of an rfft2 of ``shape``."""
    fy = sfft.fftfreq(shape[0])[:, None]
    fx = sfft.rfftfreq(shape[1])[None, :]
    return np.asarray(np.sqrt(fy * fy + fx * fx), dtype=np.float64)


def _check(image: FloatImage, mask: BoolImage) -> tuple[FloatImage, BoolImage]:
    values = np.asarray(image, dtype=np.float32)
    inside = np.asarray(mask, dtype=bool)
    if values.ndim != 2:
        raise ImageError(f"expected a 2-D image, got shape {values.shape}")
    if values.shape != inside.shape:
        raise ImageError(f"image {values.shape} and mask {inside.shape} differ in shape")
    if not inside.any():
        raise ImageError("the mask is empty: no breast to match")
    if not np.isfinite(values[inside]).all():
        raise ImageError("the image has non-finite values inside the mask")
    return values, inside


def fill_outside(image: FloatImage, mask: BoolImage, sigma: float) -> tuple[FloatImage, float]:
    """(image with a smooth extension of the breast outside ``mask``, the breast mean)."""
    values, inside = _check(image, mask)
    mean = float(values[inside].mean(dtype=np.float64))
    # Normalised convolution, on a grid decimated to about sigma/4 (the extension is
    # smooth), brought back to full size by bilinear interpolation.
    step = max(1, int(sigma // 4))
    num = _decimate(np.where(inside, values, np.float32(0.0)), step)
    den = _decimate(inside.astype(np.float32), step)
    num = ndi.gaussian_filter(num, sigma / step, mode="constant", truncate=3.0)
    den = ndi.gaussian_filter(den, sigma / step, mode="constant", truncate=3.0)
    extension = (num + np.float32(FILL_EPS * mean)) / (den + np.float32(FILL_EPS))
    if step > 1:
        h, w = values.shape
        extension = (
            _upsample_matrix(h, extension.shape[0], step)
            @ extension
            @ _upsample_matrix(w, extension.shape[1], step).T
        )
    return np.where(inside, values, extension).astype(np.float32), mean


def _decimate(array: FloatImage, step: int) -> FloatImage:
    """Block means of ``step`` x ``step`` pixels (zero beyond the image)."""
    if step == 1:
        return array
    h, w = array.shape
    padded = np.zeros((-(-h // step) * step, -(-w // step) * step), dtype=np.float32)
    padded[:h, :w] = array
    return np.asarray(
        padded.reshape(padded.shape[0] // step, step, -1, step).mean(axis=(1, 3)), dtype=np.float32
    )


def _upsample_matrix(n_out: int, n_in: int, step: int) -> FloatImage:
    """(n_out, n_in) linear interpolation from block centres back to pixel centres."""
    position = np.clip((np.arange(n_out) + 0.5) / step - 0.5, 0.0, n_in - 1.0)
    low = np.floor(position).astype(np.intp)
    high = np.minimum(low + 1, n_in - 1)
    frac = (position - low).astype(np.float32)
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    matrix[rows, low] += 1.0 - frac
    matrix[rows, high] += frac
    return matrix


def _power_of_filled(
    filled: FloatImage, mask: BoolImage, mean: float, config: SpectralConfig
) -> FloatArray:
    h, w = filled.shape
    window = np.outer(windows.tukey(h, TAPER), windows.tukey(w, TAPER)).astype(np.float32)
    spectrum = sfft.rfft2((filled - np.float32(mean)) * window, workers=-1)
    power = np.square(np.abs(spectrum)).ravel()
    norm = float((window[mask].astype(np.float64) ** 2).sum())
    index = np.floor(_radial_frequency((h, w)).ravel() / 0.5 * config.bins).astype(np.intp)
    keep = index < config.bins  # the corners beyond 0.5 cycles/pixel are left out
    sums = np.bincount(index[keep], weights=power[keep], minlength=config.bins)
    counts = np.bincount(index[keep], minlength=config.bins)
    centres = bin_centres(config)
    full = counts > 0
    if not norm > 0.0:
        raise ImageError("the breast lies only on the image border: no spectrum to estimate")
    per_bin = sums[full] / counts[full] / norm
    # Bins without a coefficient (tiny images) take their neighbours' value.
    return np.asarray(np.interp(centres, centres[full], per_bin), dtype=np.float64)


def radial_power(
    image: FloatImage, mask: BoolImage, config: SpectralConfig = SpectralConfig()
) -> FloatArray:
    """Radially averaged power spectrum of the breast, per bin (see :func:`bin_centres`),
    normalised per breast pixel so that images of any shape and breast size compare."""
    filled, mean = fill_outside(image, mask, config.fill_sigma)
    return _power_of_filled(filled, np.asarray(mask, dtype=bool), mean, config)


def log_gain(
    source_power: FloatArray,
    reference_power: FloatArray,
    config: SpectralConfig,
    start: FloatArray | None = None,
) -> FloatArray:
    """log g per bin: half the log power ratio, smoothed across bins, added to ``start``
    (a previous pass's log gain) and clipped; the low cut-off is applied later."""
    src = np.asarray(source_power, dtype=np.float64)
    ref = np.asarray(reference_power, dtype=np.float64)
    valid = (src > 0) & (ref > 0)
    out = np.zeros_like(src)
    out[valid] = 0.5 * np.log(ref[valid] / src[valid])
    if config.smooth_bins > 0:
        out = np.asarray(
            ndi.gaussian_filter1d(out, config.smooth_bins, mode="nearest"), dtype=np.float64
        )
    if start is not None:
        out = out + start
    return np.clip(out, np.log(config.min_gain), np.log(config.max_gain))


def gain_curve(
    frequency: npt.NDArray[np.floating], log_gain_bins: FloatArray, config: SpectralConfig
) -> FloatArray:
    """The amplitude gain at any frequencies (cycles/pixel): the bins' log gain interpolated,
    exactly 1 at and below ``low_cutoff``, ramping in over one bin width above it."""
    f = np.asarray(frequency, dtype=np.float64)
    ramp = np.clip((f - config.low_cutoff) * (2.0 * config.bins), 0.0, 1.0)
    return np.asarray(
        np.exp(ramp * np.interp(f, bin_centres(config), log_gain_bins)), dtype=np.float64
    )


def _apply(
    filled: FloatImage, mean: float, log_gain_bins: FloatArray, config: SpectralConfig
) -> FloatImage:
    h, w = filled.shape
    pad = min(PAD, h - 1, w - 1)
    padded = (
        np.pad(filled - np.float32(mean), pad, mode="reflect")
        if pad > 0
        else filled - np.float32(mean)
    )
    shape = (
        sfft.next_fast_len(padded.shape[0], real=True),
        sfft.next_fast_len(padded.shape[1], real=True),
    )
    spectrum = sfft.rfft2(padded, s=shape, workers=-1)
    spectrum *= gain_curve(_radial_frequency(shape), log_gain_bins, config).astype(np.float32)
    out = sfft.irfft2(spectrum, s=shape, workers=-1)[pad : pad + h, pad : pad + w]
    return np.asarray(out + np.float32(mean), dtype=np.float32)


def spectral_match(
    image: FloatImage,
    mask: BoolImage,
    references: Sequence[tuple[FloatImage, BoolImage]],
    config: SpectralConfig = SpectralConfig(),
    background: float | None = None,
    reference_power: FloatArray | None = None,
) -> SpectralResult:
    """Match the breast's radial power spectrum to the references' mean, then its histogram.

    ``image`` is the EHM-matched source (in the references' intensity scale); ``references``
    are (image, mask) pairs of any shapes. The output's masked pixels have the pooled
    reference breast pixels' distribution exactly (as :func:`.ehm.exact_histogram_match`);
    outside the mask it is ``background`` (kept as it was when None).
    ``reference_power``: the references' mean :func:`radial_power`, when already known.

    Raises:
        ImageError: an image or mask that does not fit, no references, or a
            ``reference_power`` of the wrong length.
    """
    values, inside = _check(image, mask)
    if not references:
        raise ImageError("no references to match the spectrum to")
    checked = [_check(ref, ref_mask) for ref, ref_mask in references]
    target = np.sort(np.concatenate([ref[ref_mask] for ref, ref_mask in checked]))  # sorted once
    if reference_power is None:
        reference_power = np.mean(
            [radial_power(ref, ref_mask, config) for ref, ref_mask in checked], axis=0
        )
    ref_power = np.asarray(reference_power, dtype=np.float64)
    if ref_power.shape != (config.bins,):
        raise ImageError(f"reference power has shape {ref_power.shape}, expected ({config.bins},)")
    filled, mean = fill_outside(values, inside, config.fill_sigma)
    source_power = _power_of_filled(filled, inside, mean, config)
    gains = log_gain(source_power, ref_power, config)
    for step in range(config.iterations):
        filtered = _apply(filled, mean, gains, config)
        filtered[~inside] = values[~inside]
        if step == config.iterations - 1:
            out = exact_histogram_match(filtered, inside, target, background=background)
            break
        # The histogram match moves some power between bands; correct the gain for what
        # this pass reached (always as one filter of the input, clipped as a whole).
        ranked = _rank_match(filtered, inside, target)
        reached = radial_power(ranked, inside, config)
        gains = log_gain(reached, ref_power, config, start=gains)
    return SpectralResult(
        image=out,
        frequencies=bin_centres(config),
        source_power=source_power,
        reference_power=ref_power,
        gain=gain_curve(bin_centres(config), gains, config),
    )


def _rank_match(image: FloatImage, mask: BoolImage, target: FloatImage) -> FloatImage:
    """Histogram specification by rank alone (no tie-breaking): the fast intermediate match."""
    out = np.array(image, dtype=np.float32, copy=True)
    order = np.argsort(out[mask], kind="stable")
    matched = np.empty(order.size, dtype=np.float32)
    matched[order] = target_quantiles(target, order.size)
    out[mask] = matched
    return out
