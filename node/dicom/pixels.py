"""DICOM pixel I/O: stored pixel data to the engine's float image and back.

Decoding (shared with the bank) lives in :mod:`mr2nst.bank.dicom_image` and is re-exported
here; this module adds the way back. Conventions (see METHOD.md "Intensities"):

- :func:`decode` maps the *full* range of ``BitsStored`` linearly onto [0, 1], inverted
  for MONOCHROME1, so a passthrough round trip (decode -> ``StoredRange.from_unit`` ->
  :func:`encode_into`) reproduces every stored value.
- :func:`encode_into` always writes uncompressed, little endian, 16 bits allocated, with
  the Modality LUT reduced to identity and one VOI window computed from the new pixels.
- Messages of the exceptions raised here never contain patient data.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset

from mr2nst.bank.dicom_image import (
    MONOCHROME,
    DecodedImage,
    decode,
    decode_stored,
    photometric_of,
    source_info,
    text_of,
)
from mr2nst.core.intensity import StoredRange
from mr2nst.node.dicom.sopclasses import OUTPUT_TRANSFER_SYNTAX
from mr2nst.node.errors import PixelError

__all__ = [
    "DecodedImage",
    "decode",
    "decode_stored",
    "encode_into",
    "output_range",
    "source_info",
    "window_for",
]


#: Pixels within this fraction of the dynamic range above the darkest value (in unit,
#: brighter = denser space) count as background when the window is computed ...
BACKGROUND_TOLERANCE = 0.02
#: ... provided they cover at least this fraction of the image (otherwise: no background).
MIN_BACKGROUND_FRACTION = 0.01
#: Percentiles of the non-background stored values that the window spans.
WINDOW_PERCENTILES = (0.5, 99.5)
WINDOW_EXPLANATION = "MR2NST AUTO"

# Attributes that describe the old pixel values and would be false for new ones.
_STALE_PIXEL_ATTRIBUTES = (
    "FloatPixelData",
    "DoubleFloatPixelData",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelDataProviderURL",
    "NumberOfFrames",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "VOILUTSequence",
    "VOILUTFunction",
    "WindowCenterWidthExplanation",
    "HistogramSequence",
    "IconImageSequence",
)


def output_range(decoded: DecodedImage, target: StoredRange | None) -> StoredRange:
    """The range to write a method's output with: the target domain's bits and levels
    (or the source's own when ``target`` is None) in the source's photometric interpretation."""
    if target is None:
        return decoded.stored_range
    return replace(target, invert=decoded.stored_range.invert)


def window_for(stored: npt.NDArray[np.integer], rng: StoredRange) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) spanning the robust range of the non-background pixels.

    Background is found in unit space (brighter = denser), so it is the low stored values
    of a MONOCHROME2 image and the high ones of a MONOCHROME1 image. The window maps
    [lo, hi] (the 0.5 and 99.5 percentiles, whole stored values) onto the full output
    with the LINEAR function of PS3.3 C.11.2.1.2: width = hi - lo + 1, center = (lo + hi + 1) / 2.
    """
    values = np.asarray(stored)
    unit = rng.to_unit(values)
    darkest, brightest = float(unit.min()), float(unit.max())
    mask = unit > darkest + BACKGROUND_TOLERANCE * (brightest - darkest)
    background = 1.0 - float(mask.mean())
    selected = values[mask] if MIN_BACKGROUND_FRACTION <= background < 1.0 else values.ravel()
    lo_p, hi_p = np.percentile(selected, WINDOW_PERCENTILES)
    lo, hi = float(np.floor(lo_p)), float(np.ceil(hi_p))
    return (lo + hi + 1.0) / 2.0, hi - lo + 1.0


def _check_stored(stored: npt.NDArray[np.generic], rng: StoredRange) -> npt.NDArray[np.uint16]:
    arr = np.asarray(stored)
    if arr.ndim != 2 or 0 in arr.shape:
        raise PixelError(f"expected a non-empty 2-D image, got shape {arr.shape}")
    if arr.dtype.kind not in "ui":
        raise PixelError(f"stored values must be integers, got dtype {arr.dtype}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > rng.max_value:
        raise PixelError(
            f"stored values [{low}, {high}] are outside [0, {rng.max_value}] "
            f"of BitsStored={rng.bits_stored}"
        )
    return arr.astype(np.uint16)


def _format_ds(value: float) -> str:
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def encode_into(ds: Dataset, stored: npt.NDArray[np.generic], rng: StoredRange) -> None:
    """Replace the pixel data of ``ds`` with ``stored`` (values in ``rng``).

    Also fixes what depends on it.

    Writes uncompressed 16-bit little endian data, BitsStored/HighBit from ``rng``, keeps
    PhotometricInterpretation (``rng.invert`` must agree with it), sets the Modality LUT
    to identity (RescaleSlope 1, RescaleIntercept 0; a Modality LUT Sequence is dropped),
    drops the VOI LUT Sequence and VOI LUT function and sets one LINEAR window from the
    new pixels (what a viewer applies by default; none for FOR PROCESSING images, whose
    IOD forbids a VOI LUT), and drops attributes about the old
    values (padding, smallest/largest value, histograms, icon). The file meta transfer
    syntax becomes Explicit VR Little Endian.
    """
    photometric = photometric_of(ds)
    if photometric not in MONOCHROME:
        raise PixelError(f"cannot write a {photometric or 'missing'} photometric interpretation")
    if rng.invert != (photometric == "MONOCHROME1"):
        raise PixelError(
            f"stored range invert={rng.invert} contradicts PhotometricInterpretation {photometric}"
        )
    arr = _check_stored(stored, rng)
    for keyword in _STALE_PIXEL_ATTRIBUTES:
        if keyword in ds:
            delattr(ds, keyword)
    had_modality_lut = "ModalityLUTSequence" in ds
    if had_modality_lut:
        del ds.ModalityLUTSequence
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = OUTPUT_TRANSFER_SYNTAX
    ds.set_pixel_data(arr, photometric, rng.bits_stored, generate_instance_uid=False)
    if had_modality_lut or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        if not text_of(ds, "RescaleType"):
            ds.RescaleType = "US"
    if text_of(ds, "PresentationIntentType").upper() == "FOR PROCESSING":
        # DX/MG For Processing images must not carry a VOI LUT (PS3.3 A.26, A.27).
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
        return
    center, width = window_for(arr, rng)
    ds.WindowCenter = _format_ds(center)
    ds.WindowWidth = _format_ds(width)
    ds.WindowCenterWidthExplanation = WINDOW_EXPLANATION
