"""Whether a received data set can be understood, checked before it is acknowledged.

The SCP parses every element of the data set as received (without decoding pixels) and,
for an image storage SOP class, checks that Pixel Data is present with a plausible length.
A failure raises :class:`UnreadableDataset`; the SCP answers 0xC000 Cannot Understand.
"""

from __future__ import annotations

import zlib

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.pixels.utils import get_expected_length
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

from mr2nst.node.errors import NodeError

_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_FLOAT_PIXEL_DATA = (Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))


class UnreadableDataset(NodeError):
    """A received data set is truncated, malformed or lacks plausible pixel data."""


def oversize(encoded: bytes | memoryview, transfer_syntax: str, limit: int) -> str | None:
    """Why a received data set is too large to take in, or None.

    A deflated data set is inflated in 1 MB steps that are counted and dropped, so that a
    few hundred kilobytes that inflate to gigabytes (a deflate bomb) cost no memory.

    Args:
        encoded: the data set as received.
        transfer_syntax: the presentation context's transfer syntax UID.
        limit: the most bytes allowed (``node.max_dataset_mb``), inflated.
    """
    size = len(encoded)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        size, pending = 0, bytes(encoded)
        try:
            while pending and size <= limit:
                size += len(inflate.decompress(pending, 1 << 20))
                pending = inflate.unconsumed_tail
        except zlib.error:
            return None  # not deflate data: the parse will answer "cannot understand"
    if size > limit:
        return f"data set over node.max_dataset_mb ({limit >> 20} MB)"
    return None


#: The two-letter value representations of PS3.5 6.2, as explicit VR elements carry them.
_VRS = frozenset(vr.value.encode() for vr in VR)


def encoding_mismatch(encoded: bytes | memoryview, transfer_syntax: str) -> str | None:
    """Why a data set is not in its presentation context's transfer syntax, or None.

    pydicom reads implicit VR bytes sent on an explicit VR context (and the reverse) by
    looking at the first element's VR field, and pynetdicom then labels the data set with
    the context's encoding: the file kept would say one encoding and hold another, which
    the forwarder cannot re-encode. The same look tells them apart here, so that such a
    data set is refused rather than acknowledged and lost. (Deflated data sets are
    checked by their parse.)

    Args:
        encoded: the data set as received (its first 8 bytes are enough).
        transfer_syntax: the presentation context's transfer syntax UID.
    """
    syntax = UID(transfer_syntax)
    if syntax.is_deflated or len(encoded) < 8:
        return None
    explicit = bytes(encoded[4:6]) in _VRS
    if syntax.is_implicit_VR and explicit:
        return "explicit VR bytes on an implicit VR context"
    if not syntax.is_implicit_VR and not explicit:
        return "implicit VR bytes on an explicit VR context"
    return None


def check_dataset(ds: Dataset, transfer_syntax: str) -> None:
    """Parse a received data set completely and check its pixel data's length.

    Args:
        ds: the data set as decoded from the request (its elements may still be raw).
        transfer_syntax: the presentation context's transfer syntax UID.

    Raises:
        UnreadableDataset: an element is cut short or malformed, the SOP Class or Instance
            UID is missing, or an image storage instance has no pixel data or too little.
    """
    try:
        _check_complete(ds)
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise UnreadableDataset("no SOP Class UID or SOP Instance UID")
        if "Image Storage" in UID(str(ds.SOPClassUID)).name:
            _check_pixel_data(ds, UID(transfer_syntax))
    except UnreadableDataset:
        raise
    except Exception as exc:  # any parse failure of peer data means "cannot understand"
        raise UnreadableDataset(f"cannot parse data set: {exc.__class__.__name__}") from exc


def _check_complete(ds: Dataset) -> None:
    """Convert every element, nested ones included, refusing one cut short or of odd length.

    pydicom reads a value that ends early without complaint; its raw element keeps the
    declared length, so a shorter value means the data set was truncated. Value lengths
    are even (PS3.5 7.1.1); an odd one cannot be passed on (peers such as DCMTK abort).
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.length != _UNDEFINED_LENGTH:
            if raw.value is not None and len(raw.value) < raw.length:
                raise UnreadableDataset(f"{Tag(tag)} has {len(raw.value)} of {raw.length} bytes")
            if raw.length % 2:
                raise UnreadableDataset(f"{Tag(tag)} has an odd length ({raw.length})")
        elem = ds[tag]  # converts the raw value (Pixel Data stays bytes: nothing is decoded)
        if elem.VR == "SQ":
            for item in elem.value:
                _check_complete(item)


def _check_pixel_data(ds: Dataset, transfer_syntax: UID) -> None:
    """An image instance needs Pixel Data: native at least its expected length, else fragments."""
    if _PIXEL_DATA not in ds:
        if any(tag in ds for tag in _FLOAT_PIXEL_DATA):
            return
        raise UnreadableDataset("image storage instance without Pixel Data")
    element = ds[_PIXEL_DATA]
    value = element.value
    if not isinstance(value, bytes | bytearray):
        raise UnreadableDataset("Pixel Data has no value")
    if element.is_undefined_length and not transfer_syntax.is_encapsulated:
        raise UnreadableDataset(
            f"encapsulated Pixel Data (undefined length) on {transfer_syntax.name}"
        )
    if transfer_syntax.is_encapsulated:
        # The first item is the Basic Offset Table; the frames' fragments follow it.
        if not any(len(fragment) for fragment in list(generate_fragments(value))[1:]):
            raise UnreadableDataset("encapsulated Pixel Data without fragments")
        return
    expected = int(get_expected_length(ds, unit="bytes"))
    # Longer data (a trailing padding byte, or more) is readable; shorter cannot be decoded.
    if len(value) < expected:
        raise UnreadableDataset(f"Pixel Data has {len(value)} bytes, expected {expected}")
