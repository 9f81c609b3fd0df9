"""The safety gate: a normalized output is checked against its source before it is sent.

The pipeline calls :func:`check_output` after the method and before anything is sent; a
:class:`~mr2nst.node.errors.SafetyGateError` makes the node send the original instead.
Each check has its own code (the metrics label) and a detail that says what was measured
against which threshold:

``safety.shape``
    The output's shape differs from the source's.
``safety.nonfinite``
    The output holds NaN or infinite pixels.
``safety.mask_overlap``
    The breast masks (:func:`~mr2nst.core.segmentation.segment_breast`, no view: the mask
    includes any pectoral muscle) of source and output overlap (intersection over union)
    less than ``min_mask_overlap``, or either image has no breast at all.
``safety.spots``
    A bright spot that the evaluation's fixed µC detector
    (:func:`~mr2nst.core.metrics.detect_spots`) finds in the source breast at
    ``k = spot_source_k`` has no spot of the same detector, at its own ``k``
    (:data:`~mr2nst.core.metrics.DETECT_K`), in the output within ``spot_tolerance_px``.
    Both run inside the source's breast mask. The stricter level on the source side is a
    hysteresis: at the detector's own ``k`` a full-size phantom has thousands of noise
    spots, and a faithful monotone remap keeps only some of them.
``safety.constant``
    A ``constant_block_px`` square, anywhere fully inside the source breast mask, is flat in
    the output (no two neighbouring pixels differ by more than :data:`FLAT_STEP`) but not in
    the source.

Everything outside the source breast's bounding box (plus the detector's reach) is
cropped away first; the detector's answer inside the breast is the same.
:mod:`mr2nst.core.metrics` (it imports torch) is imported on first use, as the method
registry does, so processes that never check an output do not load torch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi  # type: ignore[import-untyped, unused-ignore]

from mr2nst.core.errors import ImageError
from mr2nst.core.intensity import FloatImage
from mr2nst.core.segmentation import segment_breast
from mr2nst.node.config import SafetySection
from mr2nst.node.errors import SafetyGateError

BoolImage = npt.NDArray[np.bool_]

#: Neighbouring pixels that differ by at most this (unit intensity) count as equal; a block
#: whose every step is this small spans under one stored value of a 14-bit image.
FLAT_STEP = 1e-6

Window = tuple[slice, slice]


def check_output(source: FloatImage, output: FloatImage, settings: SafetySection) -> None:
    """Raise :class:`SafetyGateError` when ``output`` is not a safe rendering of ``source``.

    Both are unit-float images (brighter = denser) in the same geometry. The first failed
    check (in the order of :func:`find_failures`) is raised; a disabled gate passes anything.
    """
    if not settings.enabled:
        return
    failures = find_failures(source, output, settings)
    if failures:
        raise failures[0]


def find_failures(
    source: FloatImage, output: FloatImage, settings: SafetySection
) -> list[SafetyGateError]:
    """Every check ``output`` fails, in the order shape, nonfinite, mask overlap, spots, constant.

    ``settings.enabled`` is not looked at. A wrong shape or a non-finite pixel stops the
    checks there (the others cannot be measured).
    """
    if source.shape != output.shape:
        return [SafetyGateError("safety.shape", f"output {output.shape} != source {source.shape}")]
    bad = int(np.count_nonzero(~np.isfinite(output)))
    if bad:
        nan = int(np.count_nonzero(np.isnan(output)))
        return [
            SafetyGateError(
                "safety.nonfinite",
                f"{bad} non-finite output pixel(s) ({nan} NaN, {bad - nan} inf), 0 allowed",
            )
        ]
    try:
        mask = segment_breast(source).mask
    except ImageError as exc:
        return [SafetyGateError("safety.mask_overlap", f"no breast found in the source: {exc}")]
    window = _breast_window(mask)
    failures = [
        _mask_overlap(mask, output, settings.min_mask_overlap),
        _spots(source[window], output[window], mask[window], window, settings),
        _constant(source[window], output[window], mask[window], window, settings.constant_block_px),
    ]
    return [f for f in failures if f is not None]


def _breast_window(mask: BoolImage) -> Window:
    """The mask's bounding box grown by the detector's reach (the whole image if empty)."""
    from mr2nst.core.metrics import TOPHAT_RADIUS

    reach = 2 * TOPHAT_RADIUS + 1  # the top-hat's opening reads this far
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return slice(None), slice(None)
    return (
        slice(max(0, int(rows[0]) - reach), int(rows[-1]) + reach + 1),
        slice(max(0, int(cols[0]) - reach), int(cols[-1]) + reach + 1),
    )


def _mask_overlap(mask: BoolImage, output: FloatImage, minimum: float) -> SafetyGateError | None:
    """``safety.mask_overlap``: IoU of the source's and the output's breast masks."""
    try:
        theirs = segment_breast(output).mask
    except ImageError as exc:
        return SafetyGateError("safety.mask_overlap", f"no breast found in the output: {exc}")
    union = int(np.count_nonzero(mask | theirs))
    iou = int(np.count_nonzero(mask & theirs)) / union if union else 0.0
    if iou >= minimum:
        return None
    return SafetyGateError(
        "safety.mask_overlap",
        f"breast mask IoU {iou:.4f} < {minimum:g} (source {int(mask.sum())} px, "
        f"output {int(theirs.sum())} px)",
    )


def _disk(radius: float) -> BoolImage:
    """Offsets within ``radius`` pixels (centre to centre)."""
    r = int(np.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray(yy * yy + xx * xx <= radius * radius)


def _spots(
    source: FloatImage,
    output: FloatImage,
    mask: BoolImage,
    window: Window,
    settings: SafetySection,
) -> SafetyGateError | None:
    """``safety.spots``: every strong source spot has an output spot within the tolerance."""
    from mr2nst.core.metrics import DETECT_K, detect_spots

    labels, count = ndi.label(
        detect_spots(source, mask, k=settings.spot_source_k), structure=np.ones((3, 3), bool)
    )
    if count == 0:
        return None
    near = ndi.binary_dilation(
        detect_spots(output, mask), structure=_disk(settings.spot_tolerance_px)
    )
    kept = np.bincount(labels[near], minlength=count + 1)[1:] > 0
    lost = np.flatnonzero(~kept)
    if lost.size == 0:
        return None
    row, col = np.argwhere(labels == int(lost[0]) + 1).mean(axis=0)
    at = (round(float(row)) + (window[0].start or 0), round(float(col)) + (window[1].start or 0))
    return SafetyGateError(
        "safety.spots",
        f"{lost.size} of {count} source spot(s) (detector k={settings.spot_source_k:g}) have no "
        f"output spot (k={DETECT_K:g}) within {settings.spot_tolerance_px:g} px; "
        f"first at (row, col) {at}",
    )


def _window_sums(values: BoolImage, height: int, width: int) -> npt.NDArray[np.int32]:
    """Count of True in every ``height`` × ``width`` window, indexed by its top-left pixel."""
    down = np.cumsum(values, axis=0, dtype=np.int32)
    rows = np.empty((down.shape[0] - height + 1, down.shape[1]), dtype=np.int32)
    rows[0] = down[height - 1]
    np.subtract(down[height:], down[:-height], out=rows[1:])
    across = np.cumsum(rows, axis=1, dtype=np.int32)
    out = across[:, width - 1 :].copy()
    out[:, 1:] -= across[:, :-width]
    return out


def _flat_blocks(image: FloatImage, mask: BoolImage, block: int) -> BoolImage:
    """Per top-left pixel: is the ``block`` square there inside ``mask`` and flat in ``image``?

    Flat: every step between neighbours, across and down, is at most FLAT_STEP. Only steps
    between two mask pixels count, so a square of such steps lies fully inside the mask.
    """
    full = block * (block - 1)
    across = (np.abs(np.diff(image, axis=1)) <= FLAT_STEP) & mask[:, 1:] & mask[:, :-1]
    if np.count_nonzero(across) < full:  # the usual case: far too few flat steps
        return np.zeros((1, 1), dtype=bool)
    flat: BoolImage = np.asarray(_window_sums(across, block, block - 1) == full)
    if not flat.any():
        return flat
    down = (np.abs(np.diff(image, axis=0)) <= FLAT_STEP) & mask[1:] & mask[:-1]
    flat &= _window_sums(down, block - 1, block) == full
    return flat


def _constant(
    source: FloatImage, output: FloatImage, mask: BoolImage, window: Window, block: int
) -> SafetyGateError | None:
    """``safety.constant``: a block inside the source breast that only the output flattened."""
    if min(mask.shape) < block:
        return None
    found = _flat_blocks(output, mask, block)
    if found.any():
        found &= ~_flat_blocks(source, mask, block)
    if not found.any():
        return None
    rows, cols = np.nonzero(found)
    at = (int(rows[0]) + (window[0].start or 0), int(cols[0]) + (window[1].start or 0))
    return SafetyGateError(
        "safety.constant",
        f"{rows.size} position(s) of a {block}x{block} px block inside the breast are constant "
        f"in the output (steps <= {FLAT_STEP:g}) but not in the source; first at (row, col) {at}",
    )
