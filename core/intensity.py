"""Mapping between stored integer pixel values and the engine's float images.

The engine works on float32 images in [0, 1] where brighter always means denser
(MONOCHROME1 data is inverted on the way in and back on the way out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ImageError

FloatImage = npt.NDArray[np.float32]

# The breast percentiles that robust_unit maps to 0 and 1.
ROBUST_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class StoredRange:
    """A linear map between stored values and unit floats.

    ``low`` is the stored value that maps to 0.0 and ``high`` the one that maps to 1.0
    (before any MONOCHROME1 inversion). ``bits_stored`` bounds what may be written back.
    """

    bits_stored: int
    low: float
    high: float
    invert: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.bits_stored <= 16:
            raise ImageError(f"bits_stored must be 1..16, got {self.bits_stored}")
        if not self.high > self.low:
            raise ImageError(f"stored range must have high > low, got [{self.low}, {self.high}]")

    @property
    def max_value(self) -> int:
        """The largest stored value, ``2**bits_stored − 1``."""
        return int(2**self.bits_stored - 1)

    @classmethod
    def full(cls, bits_stored: int, invert: bool = False) -> StoredRange:
        """The whole range of an unsigned ``bits_stored`` image: an exact, lossless map."""
        return cls(bits_stored=bits_stored, low=0.0, high=float(2**bits_stored - 1), invert=invert)

    def to_unit(self, stored: npt.NDArray[np.generic]) -> FloatImage:
        """Stored values to float32 (0..1 for values inside the range; not clipped)."""
        if stored.ndim != 2:
            raise ImageError(f"expected a 2-D image, got shape {stored.shape}")
        unit = (stored.astype(np.float64) - self.low) / (self.high - self.low)
        if self.invert:
            unit = 1.0 - unit
        return unit.astype(np.float32)

    def from_unit(self, unit: npt.NDArray[np.floating]) -> npt.NDArray[np.uint16]:
        """Float image back to rounded, clipped stored values."""
        if not np.all(np.isfinite(unit)):
            raise ImageError("image contains NaN or infinite values")
        values = np.asarray(unit, dtype=np.float64)
        if self.invert:
            values = 1.0 - values
        stored = np.rint(values * (self.high - self.low) + self.low)
        return np.clip(stored, 0, self.max_value).astype(np.uint16)


def robust_unit(image: FloatImage, mask: npt.NDArray[np.bool_]) -> FloatImage:
    """``image`` rescaled so its breast pixels' robust range spans [0, 1] (clipped)."""
    values = image[mask] if mask.any() else image.ravel()
    low, high = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
    if high - low < 1e-6:
        high = low + 1e-6
    unit: FloatImage = np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return unit


def check_unit_image(
    name: str, image: npt.NDArray[Any], shape: tuple[int, int] | None = None
) -> None:
    """Check that ``image`` is a finite 2-D float image in [0, 1] (of ``shape``, if given).

    Raises:
        ImageError: naming ``name`` and what is wrong with it.
    """
    if image.ndim != 2 or min(image.shape) < 1:
        raise ImageError(f"{name} must be a 2-D image, got shape {image.shape}")
    if shape is not None and image.shape != shape:
        raise ImageError(f"{name} has shape {image.shape}, the content {shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ImageError(f"{name} must be a float image in [0, 1], got dtype {image.dtype}")
    if not np.all(np.isfinite(image)):
        raise ImageError(f"{name} contains NaN or infinite values")
    if image.min() < 0.0 or image.max() > 1.0:
        raise ImageError(
            f"{name} must lie in [0, 1], got [{float(image.min())}, {float(image.max())}]"
        )
