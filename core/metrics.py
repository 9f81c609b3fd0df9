"""Image metrics of the evaluation harness (``mr2nst evaluate``): pure arrays in, floats out.

Every image is a float array in one common intensity scale chosen by the caller (the
harness uses [0, 1] over the full stored range of the image's DICOM, brighter = denser),
and every metric is taken *inside a breast mask*. A metric that cannot be computed for
its inputs returns ``None``; nothing here invents a value.

The metrics, by what they measure: style (:func:`gram_distance` of :func:`masked_grams`,
scored by :func:`metric_network`), intensity histogram (:func:`hist_w1`), fidelity to
the true target (:func:`masked_ssim`, :func:`masked_psnr`, :func:`structure_ssim`),
microcalcifications (:func:`uc_cnr_ratio`, :func:`uc_detected`), texture
(:func:`spectrum_dist`, :func:`sharpness_ratio`) and statistics over images
(:func:`summary`, :func:`paired_p`). Their full definitions, with the parameters held in
the constants below, are in ``docs/evaluation.md`` ("Design", Metrics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi  # type: ignore[import-untyped, unused-ignore]
from scipy import stats as sstats  # type: ignore[import-untyped, unused-ignore]
from skimage.metrics import (  # type: ignore[import-untyped, unused-ignore]
    peak_signal_noise_ratio,
    structural_similarity,
)

from .engine_config import FeatureSource
from .errors import ImageError
from .features import STYLE_LAYERS, VGGFeatures

BoolImage = npt.NDArray[np.bool_]
Array = npt.NDArray[np.floating]

#: Spot detector: top-hat disk radius (µCs are 1-4 px across), threshold in robust sigmas,
#: and the match radius between a detection and a known µC position.
TOPHAT_RADIUS = 4
DETECT_K = 4.0
MATCH_RADIUS = 2.0
#: µC CNR: annulus from ``r + ANNULUS[0]`` to ``r + ANNULUS[1]`` px around the disk.
ANNULUS = (2.0, 5.0)
#: A true-target mean CNR below this cannot anchor a ratio (the µCs are not visible there).
MIN_TRUE_CNR = 0.5
#: Gram distances are taken on images whose long side is at most this (downsampled above).
GRAM_MAX_SIDE = 1024
#: Seed of the seeded-random metric network (used when the engine runs on hed-vgg16).
METRIC_SEED = 7919
#: Texture spectrum: high-pass σ, mask erosion, window taper σ (px) and radial bin edges
#: (cycles/px); log10 power is floored at ``SPECTRUM_FLOOR``.
SPECTRUM_SIGMA = 3.0
SPECTRUM_MARGIN = 8
SPECTRUM_TAPER = 2.0
SPECTRUM_BINS = np.linspace(0.05, 0.5, 10)
SPECTRUM_FLOOR = 1e-20
#: Sharpness: high-pass σ and mask erosion (px).
SHARP_SIGMA = 2.0
SHARP_MARGIN = 6
#: Structure SSIM: low-pass σ (px) applied to both images before SSIM.
STRUCTURE_SIGMA = 1.5


def _check_pair(a: Array, b: Array, mask: BoolImage) -> None:
    if a.ndim != 2 or a.shape != b.shape or mask.shape != a.shape:
        raise ImageError(
            f"images {a.shape}, {b.shape} and mask {mask.shape} must be equal 2-D shapes"
        )


# -- style: Gram matrices inside the mask ---------------------------------------------------


def metric_network(engine_features: str, engine_seed: int) -> tuple[FeatureSource, int]:
    """(features, seed) of the style metric's network: never the network the engine optimized.

    An engine on ``"hed-vgg16"`` is scored by VGG19 ``"seeded-random"`` seeded
    ``METRIC_SEED`` (``METRIC_SEED + 1`` if the engine's seed is ``METRIC_SEED``); any
    other engine by the learned ``"hed-vgg16"``.
    """
    if engine_features == "hed-vgg16":
        return "seeded-random", METRIC_SEED + 1 if engine_seed == METRIC_SEED else METRIC_SEED
    return "hed-vgg16", 0


def masked_grams(
    features: VGGFeatures,
    image: Array,
    mask: BoolImage,
    layers: Sequence[str] = STYLE_LAYERS,
    max_side: int = GRAM_MAX_SIDE,
) -> dict[str, npt.NDArray[np.float64]] | None:
    """Per-layer Gram matrices ``F_m F_mᵀ / M`` over the feature positions inside ``mask``.

    The mask is downsampled to each layer's grid; images whose long side exceeds
    ``max_side`` are downsampled first. None when the mask is empty at some layer's
    resolution.
    """
    if image.ndim != 2 or mask.shape != image.shape:
        raise ImageError(f"image {image.shape} and mask {mask.shape} must be equal 2-D shapes")
    device = next(features.buffers()).device
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None].to(device)
    scale = max_side / max(image.shape)
    if scale < 1.0:
        size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
        x = F.interpolate(x, size=size, mode="area")
        m = F.interpolate(m, size=size, mode="area")
    out: dict[str, npt.NDArray[np.float64]] = {}
    with torch.inference_mode():
        feats = features(x, layers)
        for name in layers:
            f = feats[name].float()
            weight = F.interpolate(m, size=tuple(f.shape[-2:]), mode="area")[0, 0] > 0.5
            if not bool(weight.any()):
                return None
            flat = f[0][:, weight]  # (C, M)
            out[name] = (flat @ flat.T / float(flat.shape[1])).double().cpu().numpy()
    return out


def mean_grams(
    grams: Sequence[Mapping[str, npt.NDArray[np.float64]]],
) -> dict[str, npt.NDArray[np.float64]]:
    """Element-wise mean of several images' Grams (the target domain's Gram)."""
    if not grams:
        raise ImageError("no Gram matrices to average")
    return {k: np.mean([g[k] for g in grams], axis=0) for k in grams[0]}


def gram_distance(
    grams: Mapping[str, npt.NDArray[np.float64]], target: Mapping[str, npt.NDArray[np.float64]]
) -> float:
    """Mean over layers of ``||G - G_t||_F / ||G_t||_F`` (0 when equal).

    The relative form keeps layers of very different magnitude comparable.
    """
    terms = []
    for name, g_t in target.items():
        norm = float(np.linalg.norm(g_t))
        diff = float(np.linalg.norm(grams[name] - g_t))
        terms.append(diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf))
    return float(np.mean(terms))


# -- intensity histogram ----------------------------------------------------------------------


def hist_w1(image: Array, mask: BoolImage, target_values: Array) -> float | None:
    """Wasserstein-1 distance between the masked pixels and ``target_values`` (None if empty)."""
    values = np.asarray(image, dtype=np.float64)[mask]
    target = np.asarray(target_values, dtype=np.float64).ravel()
    if values.size == 0 or target.size == 0:
        return None
    return float(sstats.wasserstein_distance(values, target))


# -- fidelity to the true target ---------------------------------------------------------------


def masked_ssim(
    image: Array, reference: Array, mask: BoolImage, data_range: float = 1.0
) -> float | None:
    """Mean of skimage's SSIM map inside ``mask`` (None for an empty mask)."""
    _check_pair(image, reference, mask)
    if not mask.any():
        return None
    _, smap = structural_similarity(  # type: ignore[no-untyped-call, unused-ignore]
        np.asarray(reference, dtype=np.float64),
        np.asarray(image, dtype=np.float64),
        data_range=data_range,
        full=True,
    )
    return float(np.mean(smap[mask]))


def masked_psnr(
    image: Array, reference: Array, mask: BoolImage, data_range: float = 1.0
) -> float | None:
    """PSNR (dB) of the masked pixels; ``inf`` when identical, None for an empty mask."""
    _check_pair(image, reference, mask)
    if not mask.any():
        return None
    ref = np.asarray(reference, dtype=np.float64)[mask]
    img = np.asarray(image, dtype=np.float64)[mask]
    if np.array_equal(ref, img):
        return math.inf
    psnr = peak_signal_noise_ratio(ref, img, data_range=data_range)  # type: ignore[no-untyped-call, unused-ignore]
    return float(psnr)


# -- texture: power spectrum and sharpness ----------------------------------------------------


def _eroded(mask: BoolImage, margin: int) -> BoolImage:
    return np.asarray(
        ndi.binary_erosion(mask, iterations=margin) if margin > 0 else mask, dtype=bool
    )


def _masked_lowpass(
    image: npt.NDArray[np.float64], mask: BoolImage, sigma: float
) -> npt.NDArray[np.float64]:
    """Gaussian low-pass by normalised convolution: only pixels inside ``mask`` contribute."""
    weight = ndi.gaussian_filter(mask.astype(np.float64), sigma)
    blurred = ndi.gaussian_filter(np.where(mask, image, 0.0), sigma)
    return np.asarray(np.where(weight > 1e-6, blurred / np.maximum(weight, 1e-6), 0.0))


def radial_spectrum(image: Array, mask: BoolImage) -> npt.NDArray[np.float64] | None:
    """log10 radially averaged power of the high-passed, windowed breast per ``SPECTRUM_BINS`` bin.

    None when the eroded mask is empty (the breast is too small to measure).
    """
    if image.ndim != 2 or mask.shape != image.shape:
        raise ImageError(f"image {image.shape} and mask {mask.shape} must be equal 2-D shapes")
    core = _eroded(mask, SPECTRUM_MARGIN)
    if not core.any():
        return None
    img = np.asarray(image, dtype=np.float64)
    window = ndi.gaussian_filter(core.astype(np.float64), SPECTRUM_TAPER) * mask
    high = (img - _masked_lowpass(img, mask, SPECTRUM_SIGMA)) * mask
    high = (high - float(np.sum(high * window)) / float(np.sum(window))) * window
    power = np.abs(np.fft.fft2(high)) ** 2 / float(np.sum(window**2))
    fy = np.fft.fftfreq(img.shape[0])[:, None]
    fx = np.fft.fftfreq(img.shape[1])[None, :]
    radius = np.hypot(fy, fx)
    out = np.empty(len(SPECTRUM_BINS) - 1)
    for i, (lo, hi) in enumerate(zip(SPECTRUM_BINS[:-1], SPECTRUM_BINS[1:], strict=True)):
        ring = (radius >= lo) & (radius < hi)
        out[i] = float(power[ring].mean()) if ring.any() else SPECTRUM_FLOOR
    return np.asarray(np.log10(np.maximum(out, SPECTRUM_FLOOR)))


def mean_spectrum(spectra: Sequence[npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
    """Mean of several images' log10 spectra (the target domain's spectrum)."""
    if not spectra:
        raise ImageError("no spectra to average")
    return np.asarray(np.mean(np.stack(spectra), axis=0))


def spectrum_dist(
    image: Array, mask: BoolImage, target_spectrum: npt.NDArray[np.float64]
) -> float | None:
    """RMS difference of log10 power over the radial bins to ``target_spectrum`` (None if empty)."""
    spectrum = radial_spectrum(image, mask)
    if spectrum is None:
        return None
    return float(np.sqrt(np.mean((spectrum - np.asarray(target_spectrum, dtype=np.float64)) ** 2)))


def high_frequency_energy(image: Array, mask: BoolImage) -> float | None:
    """``mean((x - G_σ x)²)`` inside the mask eroded by ``SHARP_MARGIN`` (None if that is empty)."""
    core = _eroded(mask, SHARP_MARGIN)
    if not core.any():
        return None
    img = np.asarray(image, dtype=np.float64)
    return float(np.mean((img - ndi.gaussian_filter(img, SHARP_SIGMA))[core] ** 2))


def sharpness_ratio(image: Array, truth: Array, mask: BoolImage) -> float | None:
    """``sqrt(E_image / E_truth)`` of :func:`high_frequency_energy`: 1 = as sharp as the truth."""
    _check_pair(image, truth, mask)
    energy, reference = high_frequency_energy(image, mask), high_frequency_energy(truth, mask)
    if energy is None or reference is None or reference <= 0:
        return None
    return math.sqrt(energy / reference)


def structure_ssim(
    image: Array, truth: Array, mask: BoolImage, sigma: float = STRUCTURE_SIGMA
) -> float | None:
    """:func:`masked_ssim` of both images low-passed with a Gaussian of ``sigma`` px."""
    _check_pair(image, truth, mask)
    low = ndi.gaussian_filter(np.asarray(image, dtype=np.float64), sigma)
    low_truth = ndi.gaussian_filter(np.asarray(truth, dtype=np.float64), sigma)
    return masked_ssim(low, low_truth, mask)


# -- microcalcifications -----------------------------------------------------------------------


def _disk_and_annulus(
    shape: tuple[int, int], calcs: npt.NDArray[np.float64], index: int
) -> tuple[tuple[slice, slice], BoolImage, BoolImage]:
    """Window around µC ``index`` and, inside it, its disk and its annulus (others excluded)."""
    row, col, diam = (float(v) for v in calcs[index])
    radius = max(diam / 2.0, 1.0)
    outer = radius + ANNULUS[1]
    r0, r1 = max(0, int(row - outer) - 1), min(shape[0], int(row + outer) + 2)
    c0, c1 = max(0, int(col - outer) - 1), min(shape[1], int(col + outer) + 2)
    rr, cc = np.mgrid[r0:r1, c0:c1]
    dist = np.hypot(rr - row, cc - col)
    disk = dist <= radius
    annulus = (dist >= radius + ANNULUS[0]) & (dist <= outer)
    for j, (orow, ocol, odiam) in enumerate(calcs):
        if j != index:
            annulus &= np.hypot(rr - orow, cc - ocol) > max(odiam / 2.0, 1.0) + 1.5
    return (slice(r0, r1), slice(c0, c1)), disk, annulus


def uc_cnr(image: Array, calcs: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """CNR ``(mean disk - mean annulus) / std annulus`` of every µC (NaN where undefined)."""
    img = np.asarray(image, dtype=np.float64)
    pts = np.asarray(calcs, dtype=np.float64).reshape(-1, 3)
    out = np.full(len(pts), np.nan)
    for i in range(len(pts)):
        window, disk, annulus = _disk_and_annulus((img.shape[0], img.shape[1]), pts, i)
        patch = img[window]
        if not disk.any() or annulus.sum() < 8:
            continue
        noise = float(patch[annulus].std())
        if noise > 0:
            out[i] = (float(patch[disk].mean()) - float(patch[annulus].mean())) / noise
    return out


def uc_cnr_ratio(image: Array, true_target: Array, calcs: npt.NDArray[np.float64]) -> float | None:
    """Mean µC CNR of ``image`` over that of the true target rendering (None if undefined).

    A ratio of the mean CNRs, so one faint µC cannot blow it up; None too when the true
    target's mean CNR is below ``MIN_TRUE_CNR`` (its µCs are not visible).
    """
    out, ref = uc_cnr(image, calcs), uc_cnr(true_target, calcs)
    ok = np.isfinite(out) & np.isfinite(ref)
    if not ok.any():
        return None
    ref_mean = float(ref[ok].mean())
    if ref_mean < MIN_TRUE_CNR:
        return None
    return float(out[ok].mean()) / ref_mean


def detect_spots(image: Array, mask: BoolImage, k: float = DETECT_K) -> BoolImage:
    """Bright spots: white top-hat (disk radius ``TOPHAT_RADIUS``) above ``k`` robust sigmas."""
    if image.ndim != 2 or mask.shape != image.shape:
        raise ImageError(f"image {image.shape} and mask {mask.shape} must be equal 2-D shapes")
    yy, xx = np.mgrid[-TOPHAT_RADIUS : TOPHAT_RADIUS + 1, -TOPHAT_RADIUS : TOPHAT_RADIUS + 1]
    footprint = (yy * yy + xx * xx) <= TOPHAT_RADIUS * TOPHAT_RADIUS
    hat = ndi.white_tophat(np.asarray(image, dtype=np.float64), footprint=footprint)
    inside = mask & ndi.binary_erosion(mask, iterations=TOPHAT_RADIUS)
    values = hat[inside] if inside.any() else hat[mask]
    if values.size == 0:
        return np.zeros(image.shape, dtype=bool)
    median = float(np.median(values))
    sigma = 1.4826 * float(np.median(np.abs(values - median)))
    if sigma <= 0:
        sigma = float(values.std()) or 1e-12
    return np.asarray((hat > median + k * sigma) & mask)


def uc_detected(
    image: Array, mask: BoolImage, calcs: npt.NDArray[np.float64], r: float = MATCH_RADIUS
) -> float | None:
    """Fraction of known µCs with a detected spot within ``r`` px (None without µCs)."""
    pts = np.asarray(calcs, dtype=np.float64).reshape(-1, 3)
    if len(pts) == 0:
        return None
    spots = detect_spots(image, mask)
    found = 0
    for row, col, _ in pts:
        r0, r1 = max(0, int(row - r)), min(spots.shape[0], int(row + r) + 2)
        c0, c1 = max(0, int(col - r)), min(spots.shape[1], int(col + r) + 2)
        rr, cc = np.nonzero(spots[r0:r1, c0:c1])
        if rr.size and float(np.min(np.hypot(rr + r0 - row, cc + c0 - col))) <= r:
            found += 1
    return found / len(pts)


# -- aggregation and tests ---------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and count."""

    mean: float
    sd: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "sd": self.sd, "n": self.n}


def summary(values: Sequence[float | None]) -> Summary | None:
    """Mean/sd/n over the finite values; None when there are none."""
    ok = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not ok:
        return None
    sd = float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0
    return Summary(float(np.mean(ok)), sd, len(ok))


def paired_p(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Two-sided paired t-test p-value over the images where both are finite.

    None with fewer than 2 pairs, or when every difference is identical (t undefined).
    """
    pairs = [
        (float(x), float(y))
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))
    ]
    if len(pairs) < 2:
        return None
    diff = np.array([x - y for x, y in pairs])
    if np.allclose(diff, diff[0]):
        return None
    result = sstats.ttest_rel([p[0] for p in pairs], [p[1] for p in pairs])
    p = float(result.pvalue)
    return p if math.isfinite(p) else None
