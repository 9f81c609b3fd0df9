"""Exact histogram matching (EHM), the paper's baseline.

Exact histogram specification after Coltuc, Bolon & Chassery (2006), "Exact histogram
specification", IEEE TIP 15(5): pixels are put in a strict order by their value and, to
break ties, by the means of growing neighbourhoods around them; the pixel of rank r then
gets the r-th value of the target. The output histogram inside the mask therefore equals
the target exactly (when the target has as many values as the mask has pixels; otherwise
the target's quantiles at evenly spaced ranks).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi  # type: ignore[import-untyped, unused-ignore]

from .errors import ImageError
from .intensity import FloatImage

BoolImage = npt.NDArray[np.bool_]

# Neighbourhood sizes of the tie-breaking local means (Coltuc et al. use 3x3 ... growing).
TIE_BREAK_SIZES = (3, 5, 7)


def strict_order(
    image: FloatImage,
    mask: BoolImage,
    sizes: tuple[int, ...] = TIE_BREAK_SIZES,
) -> npt.NDArray[np.intp]:
    """Indices of the masked pixels (in ``image[mask]`` order) sorted by value, then local means."""
    values = np.asarray(image, dtype=np.float32)
    keys = [ndi.uniform_filter(values, size=s, mode="reflect")[mask] for s in reversed(sizes)]
    keys.append(values[mask])  # np.lexsort: the last key is the primary one
    return np.lexsort(keys)


def target_quantiles(target: npt.NDArray[np.floating], n: int) -> FloatImage:
    """``n`` values whose multiset follows the target's distribution.

    Exactly the target when sizes match.
    """
    ordered = np.sort(np.asarray(target, dtype=np.float32).ravel())
    if ordered.size == 0:
        raise ImageError("the target histogram is empty")
    if ordered.size == n:
        return ordered
    ranks = np.rint(np.linspace(0, ordered.size - 1, n)).astype(np.intp)
    return ordered[ranks]


def exact_histogram_match(
    image: FloatImage,
    mask: BoolImage,
    target: npt.NDArray[np.floating],
    background: float | None = None,
) -> FloatImage:
    """Give the masked pixels of ``image`` the distribution of ``target`` exactly.

    ``target`` holds target-domain pixel values (for example the pooled breast pixels of
    the selected references). Pixels outside the mask are set to ``background`` (kept as
    they are when None).

    Returns:
        A float32 copy of ``image``.

    Raises:
        ImageError: ``image`` and ``mask`` differ in shape, the mask is empty, or
            ``target`` is.
    """
    if image.shape != mask.shape:
        raise ImageError(f"image {image.shape} and mask {mask.shape} differ in shape")
    count = int(mask.sum())
    if count == 0:
        raise ImageError("the mask is empty: no breast to match")
    order = strict_order(image, mask)
    matched = np.empty(count, dtype=np.float32)
    matched[order] = target_quantiles(target, count)
    out = np.array(image, dtype=np.float32, copy=True)
    if background is not None:
        out[~mask] = np.float32(background)
    out[mask] = matched
    return out
