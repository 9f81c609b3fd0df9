"""Transcoding before sending: a destination's ``transfer_syntax`` setting.

Lossless only, through pydicom's pixel handlers (decoders: pylibjpeg and its plugins;
JPEG 2000 encoder: pylibjpeg-openjpeg). The SOP Instance UID is kept: the pixel values
do not change, so the instance stays the same (PS3.5 Annex A: a lossless transfer syntax
change keeps the UID), and the node's output UIDs stay deterministic.

- ``as-received``: the data set as stored, unchanged.
- ``explicit-little``: Explicit VR Little Endian; compressed pixel data is decompressed.
- ``j2k-lossless``: JPEG 2000 Image Compression (Lossless Only). A data set without Pixel
  Data (a structured report, a presentation state) has no pixels to compress and is sent
  in Explicit VR Little Endian instead.

Explicit VR Big Endian (retired in 2004) is not converted: pydicom does not write between
byte orders, so such a source fails with a clear reason.
"""

from __future__ import annotations

from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, JPEG2000Lossless

#: The transfer syntax each ``transfer_syntax`` setting sends (``as-received``: none).
OUTGOING_SYNTAX: Final[dict[str, UID]] = {
    "explicit-little": ExplicitVRLittleEndian,
    "j2k-lossless": JPEG2000Lossless,
}

# What pydicom and its plugins raise for data they cannot decode or encode.
_CODEC_ERRORS = (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError)


def transcode(ds: Dataset, setting: str) -> Dataset:
    """Bring ``ds`` into the transfer syntax a destination's ``transfer_syntax`` names.

    Args:
        ds: a data set read from a file (with its file meta); changed in place.
        setting: ``as-received``, ``explicit-little`` or ``j2k-lossless``.

    Returns:
        ``ds``, whose ``file_meta.TransferSyntaxUID`` is now the outgoing syntax.

    Raises:
        ValueError: it cannot be transcoded losslessly; the message says from what to what
            and why (and carries no patient data).
    """
    if setting == "as-received":
        return ds
    if setting not in OUTGOING_SYNTAX:
        raise ValueError(f"unknown transfer_syntax setting {setting!r}")
    source = UID(ds.file_meta.get("TransferSyntaxUID", ""))
    target = OUTGOING_SYNTAX[setting]
    if "PixelData" not in ds:
        target = ExplicitVRLittleEndian  # nothing to compress (module docstring)
    if source == target:
        return ds
    if not source.is_transfer_syntax:
        raise ValueError(
            f"cannot transcode to {target.name}: the file names no known transfer syntax "
            f"({str(source) or 'none'})"
        )
    if source == ExplicitVRBigEndian:
        raise ValueError(
            f"cannot transcode from {source.name} (retired) to {target.name}: "
            "byte order conversion is not supported"
        )
    try:
        if source.is_compressed:
            ds.decompress(generate_instance_uid=False)
        if target.is_compressed:
            ds.compress(target, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = target
    except _CODEC_ERRORS as exc:
        raise ValueError(
            f"cannot transcode from {source.name} to {target.name}: {exc.__class__.__name__}: {exc}"
        ) from exc
    return ds
