"""Building the derived instance that carries a method's output (DESIGN.md "The derived series").

The decisions behind it (what is kept, replaced, dropped and added, and why) are part of
the conformance statement: docs/conformance.md, "The derived instance".
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import numpy.typing as npt
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, PYDICOM_ROOT_UID, UID, generate_uid
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR

from mr2nst.core.intensity import StoredRange
from mr2nst.core.method import Provenance
from mr2nst.node.config import DerivedSection
from mr2nst.node.dicom.codes import code_item
from mr2nst.node.dicom.pixels import encode_into
from mr2nst.node.dicom.sopclasses import (
    ALWAYS_LOSSY_TRANSFER_SYNTAXES,
    LOSSY_METHOD,
    MAYBE_LOSSY_TRANSFER_SYNTAXES,
)
from mr2nst.node.errors import UnsupportedImageError

LO_MAX = 64
ST_MAX = 1024
SH_MAX = 16
IS_RANGE = (-(2**31), 2**31 - 1)

DERIVATION_CODE = ("110001", "DCM", "Image Processing")
SOURCE_PURPOSE_CODE = ("121322", "DCM", "Source image for image processing operation")
EQUIPMENT_PURPOSE_CODE = ("109103", "DCM", "Processing Equipment")

# Top-level attributes never copied from the source: replaced below, or false for the
# derived instance (stale pixels, signatures over other bytes, authorization of the original).
_DROPPED_TAGS = frozenset(
    Tag(keyword)
    for keyword in (
        "PixelData",
        "IconImageSequence",
        "DigitalSignaturesSequence",
        "MACParametersSequence",
        "SOPInstanceStatus",
        "SOPAuthorizationDateTime",
        "SOPAuthorizationComment",
        "AuthorizationEquipmentCertificationNumber",
        "SourceImageSequence",
        "DerivationCodeSequence",
        "DerivationDescription",
        "InstanceCreationDate",
        "InstanceCreationTime",
        "InstanceCreatorUID",
    )
)
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


@dataclass(frozen=True)
class Equipment:
    """This node, as named in the ContributingEquipmentSequence item it adds."""

    software_version: str
    station_ae: str
    manufacturer: str = "mr2nst"
    model: str = "mr2nst"
    institution: str = ""


def _root(uid_root: str) -> str:
    root = uid_root.strip() or PYDICOM_ROOT_UID
    return root if root.endswith(".") else root + "."


def derived_uids(source: Dataset, fingerprint: str, uid_root: str = "") -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the derived instance, a pure function of the
    source series / instance UID, the pipeline fingerprint and the UID root."""
    _require_uids(source)
    prefix = _root(uid_root)
    series = generate_uid(prefix, [str(source.SeriesInstanceUID), fingerprint, "series"])
    instance = generate_uid(prefix, [str(source.SOPInstanceUID), fingerprint, "instance"])
    return str(series), str(instance)


def _require_uids(source: Dataset) -> None:
    for keyword in _REQUIRED_UIDS:
        if not str(source.get(keyword, "") or "").strip():
            raise UnsupportedImageError(f"source instance has no {keyword}")


def _text(value: str, limit: int, *, multi_line: bool = False, ascii_only: bool = True) -> str:
    """``value`` without control characters (and, for our own text, non-ASCII ones) and,
    unless ``multi_line`` (ST), without backslashes, cut to a VR of ``limit`` characters."""
    cleaned = "".join(
        c if " " <= c <= "~" or (not ascii_only and c >= "\xa0") else "?" for c in value
    )
    if not multi_line:
        cleaned = cleaned.replace("\\", "/")
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3].rstrip() + "..."
    return cleaned


def series_number(source: Dataset, offset: int) -> int:
    """The source's SeriesNumber plus ``offset``, kept in IS range.

    A missing or non-numeric SeriesNumber counts as 0.
    """
    try:
        base = int(source.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        base = 0
    value = base + offset
    return (
        value if IS_RANGE[0] <= value <= IS_RANGE[1] else min(max(offset, IS_RANGE[0]), IS_RANGE[1])
    )


def _encodings(source: Dataset) -> list[str]:
    """The Python codecs of the source's SpecificCharacterSet (ASCII when it has none)."""
    charset = source.get("SpecificCharacterSet")
    if not charset:
        return ["ascii"]  # the default repertoire
    return convert_encodings(charset)


def _encodable(value: str, encodings: list[str]) -> bool:
    """Whether ``value`` can be written whole in one of ``encodings`` (no replacement)."""
    for encoding in encodings:
        try:
            value.encode(encoding)
        except (UnicodeError, LookupError):
            continue
        return True
    return False


def series_description(source: Dataset, suffix: str) -> str:
    """The source's SeriesDescription plus ``suffix`` within LO's 64 characters; the source
    part is truncated first, so the suffix always survives.

    The result is valid in the source's character set: the source part is kept as decoded
    when that set can encode it, else it falls back to ASCII (``?`` for the rest); the
    suffix is ASCII.
    """
    suffix = _text(suffix, LO_MAX)
    text = str(source.get("SeriesDescription") or "").replace("\ufffd", "?")
    base = _text(text, LO_MAX, ascii_only=False)
    if not _encodable(base, _encodings(source)):
        base = _text(text, LO_MAX)
    room = LO_MAX - len(suffix)
    return (base[:room].rstrip() + suffix).strip() if room > 0 else suffix.strip()


def image_type(source: Dataset) -> list[str]:
    """The source's ImageType with value 1 DERIVED (value 2 defaults to PRIMARY)."""
    raw = source.get("ImageType")
    values = (
        [str(v) for v in raw] if isinstance(raw, MultiValue | list) else ([str(raw)] if raw else [])
    )
    values = values or ["ORIGINAL"]
    values[0] = "DERIVED"
    if len(values) < 2 or not values[1]:
        values[1:2] = ["PRIMARY"]
    return values


def _as_list(value: object) -> list[str]:
    if value in (None, ""):
        return []
    if isinstance(value, MultiValue | list):
        return [str(v) for v in value]
    return [str(value)]


def _lossy_history(source: Dataset) -> tuple[bool, list[str], list[str]]:
    """(is lossy, ratios, methods) of the source including its transfer compression."""
    ratios = _as_list(source.get("LossyImageCompressionRatio"))
    methods = _as_list(source.get("LossyImageCompressionMethod"))
    flagged = str(source.get("LossyImageCompression", "")).strip() == "01"
    meta = getattr(source, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if syntax not in ALWAYS_LOSSY_TRANSFER_SYNTAXES | MAYBE_LOSSY_TRANSFER_SYNTAXES:
        return flagged, ratios, methods
    method = LOSSY_METHOD[syntax]
    if not (flagged and methods and methods[-1] == method):
        pixel_data = source.get("PixelData")
        compressed = len(pixel_data) if isinstance(pixel_data, bytes) else 0
        raw = (
            int(source.get("Rows") or 0)
            * int(source.get("Columns") or 0)
            * ((int(source.get("BitsAllocated") or 16) + 7) // 8)
        )
        if compressed and len(ratios) == len(methods):
            ratios.append(f"{raw / compressed:.2f}"[:16])
        methods.append(method)
    return True, ratios, methods


def _local_now(source: Dataset, now: datetime | None) -> datetime:
    """``now`` (default: the current time) in the source's TimezoneOffsetFromUTC.

    The time zone is applied when both are known.
    """
    moment = now if now is not None else datetime.now(UTC).astimezone()
    offset = str(source.get("TimezoneOffsetFromUTC", "") or "").strip()
    if (
        moment.tzinfo is not None
        and len(offset) == 5
        and offset[0] in "+-"
        and offset[1:].isdigit()
    ):
        sign = -1 if offset[0] == "-" else 1
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[3:5]))
        moment = moment.astimezone(timezone(sign * delta))
    return moment


def _dt(moment: datetime) -> str:
    text = moment.strftime("%Y%m%d%H%M%S.%f")
    return text + moment.strftime("%z") if moment.tzinfo is not None else text


def _copy_source(source: Dataset) -> Dataset:
    """A copy of the source's top-level elements except the dropped ones.

    Text whose bytes depend on the character set keeps the source's bytes (see
    :func:`_copy_elements`), so patient identity survives byte for byte, invalid bytes
    included.
    """
    out = Dataset()
    _copy_elements(source, out, skip=lambda tag: tag in _DROPPED_TAGS or tag.element == 0)
    return out


def _copy_elements(
    source: Dataset, out: Dataset, skip: Callable[[BaseTag], bool] = lambda tag: False
) -> None:
    """Copy ``source``'s elements into ``out`` (recursively through sequences).

    An element of a character-set dependent VR (PN, LO, SH, ST, LT, UC, UT) that is still
    undecoded is copied as a raw element, its value bytes untouched, so that decoding and
    re-encoding cannot alter it (invalid UTF-8 would become U+FFFD, ISO 2022 escapes could
    move). Text values are independent of byte order and VR encoding, so the raw value is
    valid in the derived file's Explicit VR Little Endian as well. Other elements are parsed
    and deep-copied as before. ``out`` is then marked as Explicit VR Little Endian in its own
    character set, so that pydicom writes its raw elements as they are (see :func:`_seal`).
    """
    for elem in source.elements():
        tag = elem.tag
        if skip(tag):
            continue
        raw = _raw_text(elem)
        if raw is not None:
            out.add(raw)  # type: ignore[arg-type]  # pydicom stores raw elements alike
            continue
        parsed = source[tag]
        if parsed.VR == "SQ":
            out.add(
                DataElement(tag, "SQ", Sequence([_copy_item(item, out) for item in parsed.value]))
            )
        else:
            out.add(copy.deepcopy(parsed))


def _raw_text(elem: DataElement | RawDataElement) -> RawDataElement | None:
    """``elem`` as an Explicit VR Little Endian raw element, when it is undecoded text.

    Text already decoded (read by some code before) cannot give its bytes back: pydicom
    keeps only the decoded string, which is re-encoded when written.
    """
    if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
        return None
    vr = elem.VR
    if vr is None:  # implicit VR: the dictionary's (private or unknown tags: parse instead)
        try:
            vr = dictionary_VR(elem.tag)
        except KeyError:
            return None
    if vr not in CUSTOMIZABLE_CHARSET_VR or not isinstance(elem.value, bytes):
        return None  # not text, or a deferred value (None) that has no bytes to copy
    return elem._replace(VR=vr, is_implicit_VR=False, is_little_endian=True)


def _copy_item(item: Dataset, parent: Dataset) -> Dataset:
    """A copy of one sequence item, its text kept as raw bytes (see :func:`_copy_elements`)."""
    out = Dataset(parent_encoding=parent._character_set)
    _copy_elements(item, out)
    _seal(out)
    return out


def _seal(ds: Dataset) -> None:
    """Mark ``ds`` as Explicit VR Little Endian in its own character set.

    pydicom writes raw elements unchanged only when a data set's original encoding and
    character set equal the ones it writes in; it otherwise decodes and re-encodes them,
    which is what altered invalid or unusual text. pydicom also skips resolving ambiguous
    VRs on this path, so :func:`build_derived` does that itself before sealing.
    """
    ds.set_original_encoding(False, True, ds._character_set)


def _source_reference(source: Dataset, same_geometry: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = Sequence([code_item(*SOURCE_PURPOSE_CODE)])
    item.SpatialLocationsPreserved = "YES" if same_geometry else "NO"
    return item


def _equipment_item(equipment: Equipment, description: str, moment: datetime) -> Dataset:
    item = Dataset()
    item.Manufacturer = _text(equipment.manufacturer, LO_MAX)
    if equipment.institution:
        item.InstitutionName = _text(equipment.institution, LO_MAX)
    item.StationName = _text(equipment.station_ae, SH_MAX)
    item.ManufacturerModelName = _text(equipment.model, LO_MAX)
    item.SoftwareVersions = _text(equipment.software_version, LO_MAX)
    item.ContributionDateTime = _dt(moment)
    item.ContributionDescription = _text(description, ST_MAX, multi_line=True)
    item.PurposeOfReferenceCodeSequence = Sequence([code_item(*EQUIPMENT_PURPOSE_CODE)])
    return item


def build_derived(
    source: Dataset,
    stored: npt.NDArray[np.generic],
    rng: StoredRange,
    provenance: Provenance,
    *,
    fingerprint: str,
    settings: DerivedSection,
    equipment: Equipment,
    now: datetime | None = None,
) -> Dataset:
    """The derived instance of ``source`` carrying ``stored`` (values in ``rng``).

    The source is not modified. What is kept, replaced and added is listed in
    docs/conformance.md, "The derived instance".

    Args:
        source: the received instance.
        stored: the new stored pixel values (2-D, integers).
        rng: their range; ``rng.invert`` must match the source's photometric
            interpretation (see :func:`mr2nst.node.dicom.pixels.output_range`).
        provenance: what made the pixels, for DerivationDescription.
        fingerprint: the pipeline fingerprint, from which the UIDs derive.
        settings: the ``[derived]`` section.
        equipment: this node, for ContributingEquipmentSequence.
        now: the creation time (default: the current time).

    Returns:
        The derived data set, with file meta, ready for ``dcmwrite(..., enforce_file_format=True)``.

    Raises:
        UnsupportedImageError: the source lacks one of its UIDs.
        PixelError: ``stored`` or ``rng`` cannot be written in the source's photometric
            interpretation.
    """
    _require_uids(source)
    series_uid, sop_uid = derived_uids(source, fingerprint, settings.uid_root)
    moment = _local_now(source, now)
    description = _text(provenance.describe(), ST_MAX, multi_line=True)

    out = _copy_source(source)
    out.SeriesInstanceUID = series_uid
    out.SOPInstanceUID = sop_uid
    out.SeriesNumber = series_number(source, settings.series_number_offset)
    out.SeriesDescription = series_description(source, settings.description_suffix)
    out.ImageType = image_type(source)
    out.InstanceCreationDate = moment.strftime("%Y%m%d")
    out.InstanceCreationTime = moment.strftime("%H%M%S.%f")
    _add_derivation(out, source, stored, description)
    _add_contributor(out, source, equipment, description, moment)
    _add_lossy_history(out, source)
    out.file_meta = _file_meta(source, sop_uid, equipment)
    encode_into(out, stored, rng)  # also sets the transfer syntax (Explicit VR Little Endian)
    correct_ambiguous_vr(out, True)
    _seal(out)  # copied text is written with the source's bytes
    return out


def _add_derivation(
    out: Dataset, source: Dataset, stored: npt.NDArray[np.generic], description: str
) -> None:
    """DerivationDescription, DerivationCodeSequence and SourceImageSequence."""
    out.DerivationDescription = description
    out.DerivationCodeSequence = Sequence([code_item(*DERIVATION_CODE)])
    same_geometry = tuple(np.shape(stored)) == (
        int(source.get("Rows", 0)),
        int(source.get("Columns", 0)),
    )
    out.SourceImageSequence = Sequence([_source_reference(source, same_geometry)])


def _add_contributor(
    out: Dataset, source: Dataset, equipment: Equipment, description: str, moment: datetime
) -> None:
    """The source's ContributingEquipmentSequence items plus this node's."""
    contributors = [
        _copy_item(item, out) for item in source.get("ContributingEquipmentSequence") or []
    ]
    contributors.append(_equipment_item(equipment, description, moment))
    out.ContributingEquipmentSequence = Sequence(contributors)


def _add_lossy_history(out: Dataset, source: Dataset) -> None:
    """LossyImageCompression "01" with ratios and methods, when the source was ever lossy."""
    lossy, ratios, methods = _lossy_history(source)
    if lossy:
        out.LossyImageCompression = "01"
        if ratios:
            out.LossyImageCompressionRatio = ratios
        if methods:
            out.LossyImageCompressionMethod = methods


def _file_meta(source: Dataset, sop_uid: str, equipment: Equipment) -> FileMetaDataset:
    """The derived file's meta information (the transfer syntax is set by ``encode_into``)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(source.SOPClassUID))
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _text(f"MR2NST_{equipment.software_version}", SH_MAX)
    if equipment.station_ae:
        meta.SourceApplicationEntityTitle = _text(equipment.station_ae, SH_MAX)
    return meta
