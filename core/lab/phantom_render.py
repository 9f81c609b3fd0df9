"""Vendor-style renderings of a phantom's density map, and power-law noise.

A density map (float32, [0, 1], brighter = denser, exactly 0 outside the breast) is
turned into what a vendor's "for presentation" processing would show:

- **GE-like** (soft): a wider detector blur, a gentle logarithmic tone curve with a
  compressed contrast, a lifted background and smooth (correlated) quantum noise.
- **UIH-like** (sharp): a narrow blur followed by two-scale unsharp masking (local
  contrast enhancement), a steeper S-shaped tone curve, a black background and fine
  (white) quantum noise.

The two styles differ in their tone curves *and* in their spatial-frequency content, so a
plain histogram match of GE to UIH cannot recover the UIH image.

Everything is vectorised (scipy.ndimage, scipy.fft) and deterministic for a given
generator or seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import fft as sfft  # type: ignore[import-untyped, unused-ignore]
from scipy import ndimage as ndi  # type: ignore[import-untyped, unused-ignore]

from mr2nst.core.errors import ImageError
from mr2nst.core.intensity import FloatImage

BoolImage = npt.NDArray[np.bool_]
SeedLike = int | np.random.Generator

# scipy.fft worker threads; any count gives identical results (independent 1-D transforms).
_FFT_WORKERS = 2


@dataclass(frozen=True)
class VendorStyle:
    """The parameters of one vendor's rendering (see :func:`render_style`)."""

    blur_sigma: float  # detector/processing blur, px
    sharpen_fine: float  # unsharp-mask gain of the fine band (sigma 1.5 px)
    sharpen_coarse: float  # unsharp-mask gain of the coarse band (sigma 8 px)
    tone: str  # "log" or "sigmoid"
    tone_k: float  # tone-curve steepness
    tone_mid: float  # sigmoid midpoint (ignored by "log")
    low: float  # output value of zero density inside the breast
    high: float  # output value of full density
    background: float  # output value outside the breast
    noise: float  # quantum-noise std at full signal
    noise_corr: float  # noise correlation length (Gaussian sigma, px); 0 = white


GE_STYLE = VendorStyle(
    blur_sigma=0.7,
    sharpen_fine=0.0,
    sharpen_coarse=0.0,
    tone="log",
    tone_k=2.0,
    tone_mid=0.0,
    low=0.12,
    high=0.9,
    background=0.05,
    noise=0.009,
    noise_corr=0.6,
)

UIH_STYLE = VendorStyle(
    blur_sigma=0.4,
    sharpen_fine=0.6,
    sharpen_coarse=0.35,
    tone="sigmoid",
    tone_k=3.0,
    tone_mid=0.45,
    low=0.03,
    high=0.97,
    background=0.004,
    noise=0.009,
    noise_corr=0.0,
)


def as_generator(rng: SeedLike) -> np.random.Generator:
    """A numpy Generator from a seed or an existing generator (returned as is)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def powerlaw_noise(
    shape: tuple[int, int], beta: float, rng: SeedLike, *, f_low: float = 0.0
) -> FloatImage:
    """Gaussian noise with a 1/f^beta power spectrum, zero mean and unit std (float32).

    ``f_low`` (cycles/px) rolls the spectrum off below that frequency, so that the field
    is not dominated by one image-sized blob. Built in the Fourier domain with one real
    inverse FFT of a fast length, then cropped.
    """
    h, w = shape
    if h < 2 or w < 2:
        raise ImageError(f"power-law noise needs at least 2x2 pixels, got {shape}")
    gen = as_generator(rng)
    fh = sfft.next_fast_len(h, real=True)
    fw = sfft.next_fast_len(w, real=True)
    fy = np.fft.fftfreq(fh).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(fw).astype(np.float32)[None, :]
    f2 = fy * fy + fx * fx + np.float32(f_low * f_low)
    f2[0, 0] = np.float32(1.0)  # avoid 0 ** negative; the DC term is zeroed below
    amp = f2 ** np.float32(-beta / 4.0)  # power ~ f^-beta, so amplitude ~ f^(-beta/2)
    amp[0, 0] = 0.0
    spec = np.empty((fh, fw // 2 + 1), dtype=np.complex64)
    spec.real = gen.standard_normal(spec.shape, dtype=np.float32)
    spec.imag = gen.standard_normal(spec.shape, dtype=np.float32)
    spec *= amp
    field = sfft.irfft2(spec, s=(fh, fw), workers=_FFT_WORKERS)[:h, :w]
    field = field - field.mean(dtype=np.float64)
    std = float(field.std(dtype=np.float64))
    return np.asarray(field / (std if std > 0 else 1.0), dtype=np.float32)


def _check(density: npt.NDArray[np.floating], mask: BoolImage) -> FloatImage:
    if density.ndim != 2 or mask.shape != density.shape:
        raise ImageError(f"density {density.shape} and mask {mask.shape} must be equal 2-D shapes")
    return np.asarray(density, dtype=np.float32)


def _tone(x: FloatImage, style: VendorStyle) -> FloatImage:
    """Monotone tone curve mapping density [0, 1] onto [0, 1]."""
    k = np.float32(style.tone_k)
    if style.tone == "log":
        y = np.log1p(k * np.clip(x, 0.0, 1.2)) / np.float32(np.log1p(style.tone_k))
    else:
        mid = np.float32(style.tone_mid)
        lo = np.tanh(k * (0 - mid))
        hi = np.tanh(k * (1 - mid))
        y = (np.tanh(k * (x - mid)) - lo) / np.float32(hi - lo)
    return np.asarray(y, dtype=np.float32)


def render_style(
    density: npt.NDArray[np.floating], mask: BoolImage, rng: SeedLike, style: VendorStyle
) -> FloatImage:
    """Render ``density`` (inside ``mask``) in a vendor ``style``; float32 in [0, 1]."""
    d = _check(density, mask)
    gen = as_generator(rng)
    x = ndi.gaussian_filter(d, style.blur_sigma, mode="nearest") if style.blur_sigma > 0 else d
    if style.sharpen_fine or style.sharpen_coarse:
        fine = ndi.gaussian_filter(x, 1.5, mode="nearest")
        coarse = ndi.gaussian_filter(fine, 8.0, mode="nearest")
        x = x + np.float32(style.sharpen_fine) * (x - fine)
        x = x + np.float32(style.sharpen_coarse) * (fine - coarse)
    y = np.float32(style.low) + np.float32(style.high - style.low) * _tone(x, style)
    # Soft transition to the background over the skin fall-off (density -> 0 at the edge).
    edge = np.clip(ndi.gaussian_filter(mask.astype(np.float32), 1.0, mode="nearest"), 0, 1)
    y = edge * y + (np.float32(1.0) - edge) * np.float32(style.background)
    # Quantum-like noise: std grows with the square root of the signal.
    white = gen.standard_normal(d.shape, dtype=np.float32)
    if style.noise_corr > 0:
        white = ndi.gaussian_filter(white, style.noise_corr, mode="wrap")
        white *= np.float32(1.0 / max(float(white.std()), 1e-6))
    sigma = np.float32(style.noise) * np.sqrt(np.clip(y, 0.02, 1.0))
    y = y + sigma * white
    return np.asarray(np.clip(y, 0.0, 1.0), dtype=np.float32)


def render_ge(density: npt.NDArray[np.floating], mask: BoolImage, rng: SeedLike) -> FloatImage:
    """The soft, lower-contrast GE-like rendering (float32 in [0, 1], brighter = denser)."""
    return render_style(density, mask, rng, GE_STYLE)


def render_uih(density: npt.NDArray[np.floating], mask: BoolImage, rng: SeedLike) -> FloatImage:
    """The sharp, higher-contrast UIH-like rendering (float32 in [0, 1], brighter = denser)."""
    return render_style(density, mask, rng, UIH_STYLE)
