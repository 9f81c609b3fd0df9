"""Reading mammogram DICOMs: stored pixels to the engine's float image, plus view,
laterality, pixel spacing and manufacturer.

Shared by the bank (ingesting references) and the node (decoding received instances).
Decoding goes through pydicom's pixel decoders (native, deflated and RLE data) and the
pylibjpeg plugins (JPEG 2000, JPEG, JPEG-LS); nothing is decoded by hand here.

- :func:`decode` maps the *full* range of ``BitsStored`` linearly onto [0, 1], inverted
  for MONOCHROME1 so that brighter always means denser. Robust, breast-mask based
  scaling is the engine's job; keeping this map exact means a passthrough round trip
  reproduces every stored value.
- Only single-frame, one-sample, unsigned MONOCHROME1/2 images are accepted. Signed
  pixel data (PixelRepresentation 1) is rejected with :class:`UnsupportedImageError`:
  the DX and MG IODs require unsigned data (PS3.3 C.8.11.3), so a signed instance is
  malformed, and offsetting it would silently change what its values mean.
- Messages of the exceptions raised here never contain patient data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from mr2nst.core.intensity import FloatImage, StoredRange
from mr2nst.core.method import SourceInfo

from .errors import PixelError, UnsupportedImageError

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

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


def photometric_of(ds: Dataset) -> str:
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
    photometric = photometric_of(ds)
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
    rng = StoredRange.full(int(ds.BitsStored), invert=photometric_of(ds) == "MONOCHROME1")
    return DecodedImage(image=rng.to_unit(stored), stored_range=rng, info=source_info(ds))


def text_of(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value not in (None, "") else ""


def _view(ds: Dataset) -> str:
    position = text_of(ds, "ViewPosition").upper()
    if position:
        return position
    for item in ds.get("ViewCodeSequence") or []:
        value = text_of(item, "CodeValue")
        if value in _VIEW_CODES:
            return _VIEW_CODES[value]
        meaning = text_of(item, "CodeMeaning").lower()
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
    laterality = (text_of(ds, "ImageLaterality") or text_of(ds, "Laterality")).upper()
    return SourceInfo(
        view=_view(ds),
        laterality=laterality if laterality in ("L", "R") else "",
        pixel_spacing_mm=_spacing(ds),
        manufacturer=text_of(ds, "Manufacturer"),
    )
