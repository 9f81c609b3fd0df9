"""DICOM pixel I/O: stored pixel data to the engine's float image and back.

Decoding goes through pydicom's pixel decoders (native, deflated and RLE data) and the
pylibjpeg plugins (JPEG 2000, JPEG, JPEG-LS); nothing is decoded by hand here.

Conventions (see METHOD.md "Intensities"):

- :func:`decode` maps the *full* range of ``BitsStored`` linearly onto [0, 1], inverted
  for MONOCHROME1 so that brighter always means denser. Robust, breast-mask based
  scaling is the engine's job; keeping this map exact means a passthrough round trip
  (decode -> ``StoredRange.from_unit`` -> :func:`encode_into`) reproduces every stored
  value.
- Only single-frame, one-sample, unsigned MONOCHROME1/2 images are accepted. Signed
  pixel data (PixelRepresentation 1) is rejected with :class:`UnsupportedImageError`:
  the DX and MG IODs require unsigned data (PS3.3 C.8.11.3), so a signed instance is
  malformed, and offsetting it would silently change what its values mean.
- :func:`encode_into` always writes uncompressed, little endian, 16 bits allocated, with
  the Modality LUT reduced to identity and one VOI window computed from the new pixels.
- Messages of the exceptions raised here never contain patient data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from mr2nst.core.intensity import FloatImage, StoredRange
from mr2nst.core.method import SourceInfo

from .errors import PixelError, UnsupportedImageError
from .sopclasses import OUTPUT_TRANSFER_SYNTAX

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

#: Pixels within this fraction of the dynamic range above the darkest value (in unit,
#: brighter = denser space) count as background when the window is computed ...
BACKGROUND_TOLERANCE = 0.02
#: ... provided they cover at least this fraction of the image (otherwise: no background).
MIN_BACKGROUND_FRACTION = 0.01
#: Percentiles of the non-background stored values that the window spans.
WINDOW_PERCENTILES = (0.5, 99.5)
WINDOW_EXPLANATION = "MR2NST AUTO"

# What pydicom and its plugins raise on truncated or corrupt pixel data.
_DECODE_ERRORS = (
    ValueError,
    RuntimeError,
    NotImplementedError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    OSError,
    EOFError,
    struct.error,
    zlib.error,
)

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

# ViewCodeSequence code values (SNOMED CT and the legacy SNOMED RT ids, CID 4014) to
# the usual mammography view abbreviations.
_VIEW_CODES = {
    "399162004": "CC",
    "R-10242": "CC",
    "399368009": "MLO",
    "R-10226": "MLO",
    "399260004": "ML",
    "R-10224": "ML",
    "399352003": "LM",
    "R-10228": "LM",
    "399099002": "LMO",
    "R-10230": "LMO",
    "399196006": "XCCL",
    "Y-X1770": "XCCL",
    "399192008": "XCCM",
    "Y-X1771": "XCCM",
    "399101009": "FB",
    "R-10244": "FB",
    "399188001": "SIO",
    "R-102D0": "SIO",
    "441555000": "ISO",
    "R-40AAA": "ISO",
    "399265009": "XCC",
    "R-1024A": "XCC",
}
_VIEW_MEANINGS = {
    "cranio-caudal": "CC",
    "medio-lateral oblique": "MLO",
    "medio-lateral": "ML",
    "latero-medial": "LM",
    "latero-medial oblique": "LMO",
    "exaggerated cranio-caudal": "XCC",
}


@dataclass(frozen=True)
class DecodedImage:
    """A decoded source image, ready for a method."""

    image: FloatImage  # float32 HxW in [0, 1] over the stored range, brighter = denser
    stored_range: StoredRange  # full range of BitsStored; invert = MONOCHROME1
    info: SourceInfo


def _photometric(ds: Dataset) -> str:
    return str(ds.get("PhotometricInterpretation", "")).strip().upper()


def _check_geometry(ds: Dataset) -> None:
    if "PixelData" not in ds:
        what = (
            "float pixel data"
            if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds
            else "no pixel data"
        )
        raise UnsupportedImageError(f"instance has {what}; an integer grayscale image is required")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = _photometric(ds)
    if samples != 1 or photometric not in MONOCHROME:
        raise UnsupportedImageError(
            f"not a monochrome image (SamplesPerPixel={samples}, "
            f"PhotometricInterpretation={photometric or 'missing'})"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UnsupportedImageError(
            f"multi-frame images are not supported (NumberOfFrames={frames})"
        )
    if int(ds.get("PixelRepresentation", 0) or 0) != 0:
        raise UnsupportedImageError(
            "signed pixel data (PixelRepresentation=1) is not supported; "
            "DX and MG images must be unsigned"
        )
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored"):
        if ds.get(keyword) in (None, ""):
            raise PixelError(f"{keyword} is missing")
    bits = int(ds.BitsStored)
    if not 1 <= bits <= 16 or bits > int(ds.BitsAllocated):
        raise UnsupportedImageError(
            f"BitsStored={bits} with BitsAllocated={ds.BitsAllocated} is not supported (1..16 bits)"
        )


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:
        raise PixelError("the dataset has no TransferSyntaxUID in its file meta information")
    return UID(str(syntax))


def decode_stored(ds: Dataset) -> npt.NDArray[np.uint16]:
    """The stored values of a single-frame monochrome image as a native uint16 HxW array."""
    _check_geometry(ds)
    syntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise PixelError(
            f"no pixel data decoder for transfer syntax {syntax} ({syntax.name})"
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise PixelError(f"cannot decode {syntax.name}: missing plugins ({missing})")
    try:
        arr, _ = decoder.as_array(ds, index=0)
    except _DECODE_ERRORS as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise PixelError(f"cannot decode {syntax.name} pixel data: {reason}") from None
    if arr.ndim != 2 or arr.shape != (int(ds.Rows), int(ds.Columns)):
        raise PixelError(f"decoded shape {arr.shape} does not match Rows x Columns")
    top = 2 ** int(ds.BitsStored) - 1
    if arr.size and int(arr.max()) > top:
        raise PixelError(f"pixel values up to {int(arr.max())} exceed BitsStored={ds.BitsStored}")
    return np.ascontiguousarray(arr, dtype=np.uint16)


def decode(ds: Dataset) -> DecodedImage:
    """Decode ``ds`` into the engine's float image plus the exact range it was mapped with."""
    stored = decode_stored(ds)
    rng = StoredRange.full(int(ds.BitsStored), invert=_photometric(ds) == "MONOCHROME1")
    return DecodedImage(image=rng.to_unit(stored), stored_range=rng, info=source_info(ds))


def output_range(decoded: DecodedImage, target: StoredRange | None) -> StoredRange:
    """The range to write a method's output with: the target domain's bits and levels
    (or the source's own when ``target`` is None) in the source's photometric interpretation."""
    if target is None:
        return decoded.stored_range
    return replace(target, invert=decoded.stored_range.invert)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value not in (None, "") else ""


def _view(ds: Dataset) -> str:
    position = _text(ds, "ViewPosition").upper()
    if position:
        return position
    for item in ds.get("ViewCodeSequence") or []:
        value = _text(item, "CodeValue")
        if value in _VIEW_CODES:
            return _VIEW_CODES[value]
        meaning = _text(item, "CodeMeaning").lower()
        if meaning in _VIEW_MEANINGS:
            return _VIEW_MEANINGS[meaning]
    return ""


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return (row, col)
    return None


def source_info(ds: Dataset) -> SourceInfo:
    """View, laterality, pixel spacing (mm, row then column) and manufacturer of ``ds``.

    View comes from ViewPosition, else ViewCodeSequence (CID 4014 codes or meanings).
    Laterality from ImageLaterality, else the series Laterality; only L and R are kept.
    Spacing from PixelSpacing (at the patient), else ImagerPixelSpacing (at the detector).
    """
    laterality = (_text(ds, "ImageLaterality") or _text(ds, "Laterality")).upper()
    return SourceInfo(
        view=_view(ds),
        laterality=laterality if laterality in ("L", "R") else "",
        pixel_spacing_mm=_spacing(ds),
        manufacturer=_text(ds, "Manufacturer"),
    )


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
            f"stored values [{low}, {high}] are outside [0, {rng.max_value}] of BitsStored={rng.bits_stored}"
        )
    return arr.astype(np.uint16)


def _format_ds(value: float) -> str:
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def encode_into(ds: Dataset, stored: npt.NDArray[np.generic], rng: StoredRange) -> None:
    """Replace the pixel data of ``ds`` with ``stored`` (values in ``rng``) and fix what depends on it.

    Writes uncompressed 16-bit little endian data, BitsStored/HighBit from ``rng``, keeps
    PhotometricInterpretation (``rng.invert`` must agree with it), sets the Modality LUT
    to identity (RescaleSlope 1, RescaleIntercept 0; a Modality LUT Sequence is dropped),
    drops the VOI LUT Sequence and VOI LUT function and sets one LINEAR window from the
    new pixels (what a viewer applies by default; none for FOR PROCESSING images, whose
    IOD forbids a VOI LUT), and drops attributes about the old
    values (padding, smallest/largest value, histograms, icon). The file meta transfer
    syntax becomes Explicit VR Little Endian.
    """
    photometric = _photometric(ds)
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
        if not _text(ds, "RescaleType"):
            ds.RescaleType = "US"
    if _text(ds, "PresentationIntentType").upper() == "FOR PROCESSING":
        # DX/MG For Processing images must not carry a VOI LUT (PS3.3 A.26, A.27).
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in ds:
                delattr(ds, keyword)
        return
    center, width = window_for(arr, rng)
    ds.WindowCenter = _format_ds(center)
    ds.WindowWidth = _format_ds(width)
    ds.WindowCenterWidthExplanation = WINDOW_EXPLANATION
