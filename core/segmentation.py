"""Breast segmentation on engine images (float, brighter = denser).

The mask is found on a downsampled copy (long side ~512 px) for speed: a threshold
between the background level and Otsu's tissue threshold, the largest connected
component (which drops labels and markers), holes filled, then upsampled. On MLO views
the pectoral muscle is estimated as the bright region in the upper chest-wall corner,
bounded by a straight line fitted to its edge; it is part of the mask but not of the
breast area.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi  # type: ignore[import-untyped, unused-ignore]
from skimage.filters import threshold_otsu as _otsu  # type: ignore[import-untyped, unused-ignore]

from .errors import ImageError
from .intensity import FloatImage

BoolImage = npt.NDArray[np.bool_]
WORK_SIDE = 512


def threshold_otsu(values: npt.NDArray[np.floating]) -> float:
    """Otsu's threshold (scikit-image), typed."""
    return float(_otsu(values))  # type: ignore[no-untyped-call, unused-ignore]


@dataclass(frozen=True)
class Segmentation:
    """The breast region of one image."""

    mask: BoolImage  # breast including the pectoral muscle
    pectoral: BoolImage  # estimated pectoral muscle (all False on CC)
    chest_wall_left: bool  # True when the chest wall is at column 0

    @property
    def breast(self) -> BoolImage:
        """Breast tissue without the pectoral muscle."""
        return np.asarray(self.mask & ~self.pectoral)

    def area_mm2(self, spacing_mm: tuple[float, float]) -> float:
        """The breast's area (without the pectoral muscle) at (row, column) ``spacing_mm``."""
        return float(self.breast.sum()) * spacing_mm[0] * spacing_mm[1]


def _downsample(image: FloatImage) -> tuple[FloatImage, int]:
    step = max(1, int(np.ceil(max(image.shape) / WORK_SIDE)))
    h, w = (image.shape[0] // step) * step, (image.shape[1] // step) * step
    small = image[:h, :w].reshape(h // step, step, w // step, step).mean(axis=(1, 3))
    return np.asarray(small, dtype=np.float32), step


def _upsample(mask: BoolImage, step: int, shape: tuple[int, int]) -> BoolImage:
    big = np.repeat(np.repeat(mask, step, axis=0), step, axis=1)
    out = np.zeros(shape, dtype=bool)
    h, w = min(shape[0], big.shape[0]), min(shape[1], big.shape[1])
    out[:h, :w] = big[:h, :w]
    if h < shape[0]:
        out[h:, :w] = out[h - 1 : h, :w]
    if w < shape[1]:
        out[:, w:] = out[:, w - 1 : w]
    return out


def _largest_component(mask: BoolImage) -> BoolImage:
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)))


def _pectoral(small: FloatImage, mask: BoolImage) -> BoolImage:
    """Pectoral muscle of a left-oriented (chest wall at column 0) downsampled image."""
    h, w = small.shape
    out = np.zeros_like(mask)
    top = mask[: h // 2, : w // 2]
    if top.sum() < 16:
        return out
    values = small[: h // 2, : w // 2][top]
    try:
        level = float(threshold_otsu(values))
    except ValueError:
        return out
    rows: list[int] = []
    edges: list[int] = []
    for r in range(h // 2):
        bright = (small[r] > level) & mask[r]
        if not bright[0]:
            if rows:
                break
            continue
        run = int(np.argmin(bright)) if not bright.all() else w
        rows.append(r)
        edges.append(run)
    if len(rows) < max(4, h // 20):
        return out
    slope, intercept = np.polyfit(np.asarray(rows, float), np.asarray(edges, float), 1)
    if slope >= 0 or intercept <= 0 or intercept > 0.7 * w:
        return out  # a muscle edge runs from the top towards the chest wall
    rr, cc = np.mgrid[0:h, 0:w]
    out = (cc < intercept + slope * rr) & mask
    fraction = out.sum() / max(1, mask.sum())
    return out if 0.01 <= fraction <= 0.4 else np.zeros_like(mask)


def segment_breast(image: FloatImage, view: str = "") -> Segmentation:
    """Segment the breast (and, on MLO views, the pectoral muscle) of an engine image.

    Args:
        image: a 2-D float image, brighter = denser.
        view: the view position; ``"MLO"`` also estimates the pectoral muscle.

    Raises:
        ImageError: an image that is not 2-D, smaller than 16×16, or uniform (no breast).
    """
    if image.ndim != 2 or min(image.shape) < 16:
        raise ImageError(f"expected a 2-D image of at least 16x16 pixels, got shape {image.shape}")
    small, step = _downsample(np.asarray(image, dtype=np.float32))
    background = float(np.percentile(small, 2))
    try:
        otsu = float(threshold_otsu(small))
    except ValueError:
        otsu = background
    if otsu - background < 1e-4:
        raise ImageError("no breast found: the image is uniform")
    mask = small > background + 0.25 * (otsu - background)
    mask = ndi.binary_opening(mask, iterations=1)
    mask = ndi.binary_fill_holes(_largest_component(mask))
    cols = mask.sum(axis=0)
    left = bool(cols[: len(cols) // 2].sum() >= cols[len(cols) // 2 :].sum())
    pectoral = np.zeros_like(mask)
    if view.upper() == "MLO":
        oriented_small, oriented_mask = (small, mask) if left else (small[:, ::-1], mask[:, ::-1])
        pectoral = _pectoral(oriented_small, oriented_mask)
        if not left:
            pectoral = pectoral[:, ::-1]
    shape = (int(image.shape[0]), int(image.shape[1]))
    return Segmentation(_upsample(mask, step, shape), _upsample(pectoral, step, shape), left)
