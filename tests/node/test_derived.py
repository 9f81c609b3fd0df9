"""Building the derived instance: every rule of DESIGN.md "The derived series"."""

from __future__ import annotations

import copy
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import TEST_ROOT, can_encode, make_mg, recode
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    JPEG2000,
    UID,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSNearLossless,
)
from support import needs_dciodvfy

from mr2nst.core.intensity import StoredRange
from mr2nst.core.method import Provenance
from mr2nst.node.config import DerivedSection
from mr2nst.node.dicom.derived import Equipment, build_derived, derived_uids
from mr2nst.node.dicom.iod import iod_errors
from mr2nst.node.dicom.pixels import decode, decode_stored
from mr2nst.node.errors import UnsupportedImageError

NOW = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
EQUIPMENT = Equipment(software_version="0.1.0", station_ae="MR2NST")
PROVENANCE = Provenance(
    method="mr2nst",
    engine_version="0.1.0",
    references=("uih-01", "uih-02"),
    scales=(1, 2, 4),
    features="seeded-random",
)
TARGET = StoredRange.full(14)
# Patient, Study, Frame of Reference, equipment and acquisition attributes that must survive.
# fmt: off
KEPT = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
    "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer",
    "ManufacturerModelName", "InstitutionName", "StationName", "SoftwareVersions", "Modality",
    "PresentationIntentType", "ImageLaterality", "ViewCodeSequence", "AnatomicRegionSequence",
    "ImagerPixelSpacing", "ContentDate", "ContentTime", "SeriesDate", "SeriesTime",
    "InstanceNumber", "KVP", "PhotometricInterpretation", "PresentationLUTShape",
    "BurnedInAnnotation",
)
# fmt: on


def _stored(source: Dataset, rng: StoredRange = TARGET) -> np.ndarray:
    return rng.from_unit(decode(source).image)


def _build(source: Dataset, rng: StoredRange = TARGET, **kwargs: object) -> Dataset:
    options: dict[str, object] = {
        "fingerprint": "fp-1",
        "settings": DerivedSection(),
        "equipment": EQUIPMENT,
        "now": NOW,
    }
    options.update(kwargs)
    rng = StoredRange(
        rng.bits_stored, rng.low, rng.high, invert=source.PhotometricInterpretation == "MONOCHROME1"
    )
    return build_derived(source, _stored(source, rng), rng, PROVENANCE, **options)  # type: ignore[arg-type]


def _last(value: object) -> object:
    return value[-1] if isinstance(value, MultiValue) else value


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def source() -> Dataset:
    """A For Presentation MG source."""
    return make_mg()


def test_keeps_patient_study_frame_and_equipment(source: Dataset) -> None:
    """Patient, Study, Frame of Reference, equipment and acquisition attributes are kept as is."""
    out = _build(source)
    for keyword in KEPT:
        assert out[keyword].value == source[keyword].value, keyword


def test_new_deterministic_uids_and_same_sop_class(source: Dataset) -> None:
    """Series and SOP instance UIDs are new, valid and from derived_uids; the SOP class stays."""
    out = _build(source)
    assert out.SOPClassUID == source.SOPClassUID
    assert (out.SeriesInstanceUID, out.SOPInstanceUID) == derived_uids(source, "fp-1")
    assert out.SeriesInstanceUID != source.SeriesInstanceUID
    assert out.SOPInstanceUID != source.SOPInstanceUID
    assert UID(out.SOPInstanceUID).is_valid and UID(out.SeriesInstanceUID).is_valid
    root = "1.2.826.0.1.3680043.10.543.99"
    rooted = _build(source, settings=DerivedSection(uid_root=root))
    assert rooted.SOPInstanceUID.startswith(root + ".")
    assert rooted.SeriesInstanceUID.startswith(root + ".")


def test_series_grouping_by_source_series_and_fingerprint() -> None:
    """One source series gives one derived series; another fingerprint changes all UIDs."""
    first = make_mg(series_uid=TEST_ROOT + "1")
    second = make_mg(series_uid=TEST_ROOT + "1", seed=1)
    other = make_mg(series_uid=TEST_ROOT + "2")
    series_1, sop_1 = derived_uids(first, "fp-1")
    series_2, sop_2 = derived_uids(second, "fp-1")
    assert series_1 == series_2 and sop_1 != sop_2
    assert derived_uids(other, "fp-1")[0] != series_1
    series_x, sop_x = derived_uids(first, "fp-2")
    assert series_x != series_1 and sop_x != sop_1
    assert derived_uids(first, "fp-1", TEST_ROOT + "7")[0].startswith(TEST_ROOT + "7.")


def test_series_number_offset(source: Dataset) -> None:
    """SeriesNumber is the source's plus the offset, and the offset alone when it is missing."""
    assert _build(source).SeriesNumber == 7 + 1000
    assert _build(source, settings=DerivedSection(series_number_offset=50)).SeriesNumber == 57
    del source.SeriesNumber
    assert _build(source).SeriesNumber == 1000


def test_series_description_suffix_and_length(source: Dataset) -> None:
    """SeriesDescription gets the suffix, truncating the source part so it fits LO (64)."""
    assert _build(source).SeriesDescription == "L CC [UIH style, mr2NST]"
    source.SeriesDescription = "X" * 64
    long = _build(source).SeriesDescription
    assert len(long) == 64 and long.endswith(" [UIH style, mr2NST]") and long.startswith("XXX")
    source.SeriesDescription = "Dépistage G"  # ISO_IR 100 text of the source is kept
    assert _build(source).SeriesDescription == "Dépistage G [UIH style, mr2NST]"
    del source.SeriesDescription
    assert _build(source).SeriesDescription == "[UIH style, mr2NST]"


def test_image_type_value_1_is_derived(source: Dataset) -> None:
    """ImageType value 1 is DERIVED and the other values are kept."""
    assert list(_build(source).ImageType) == ["DERIVED", "PRIMARY", ""]
    source.ImageType = ["ORIGINAL", "SECONDARY"]
    assert list(_build(source).ImageType) == ["DERIVED", "SECONDARY"]
    del source.ImageType
    assert list(_build(source).ImageType) == ["DERIVED", "PRIMARY"]


def test_derivation_description_and_code(source: Dataset) -> None:
    """DerivationDescription is provenance.describe() (seeded-random stated) plus DCM 110001."""
    out = _build(source)
    assert out.DerivationDescription == PROVENANCE.describe()
    assert "features=seeded-random" in out.DerivationDescription
    (item,) = out.DerivationCodeSequence
    assert (item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning) == (
        "110001",
        "DCM",
        "Image Processing",
    )
    long = Provenance(
        method="mr2nst",
        engine_version="0.1.0",
        references=tuple(f"ref-{i:04d}" for i in range(400)),
    )
    built = build_derived(
        source,
        _stored(source),
        TARGET,
        long,
        fingerprint="f",
        settings=DerivedSection(),
        equipment=EQUIPMENT,
        now=NOW,
    )
    assert len(built.DerivationDescription) == 1024 and built.DerivationDescription.endswith("...")


def test_source_image_sequence(source: Dataset) -> None:
    """SourceImageSequence references only the source, with purpose DCM 121322."""
    source.SourceImageSequence = Sequence([Dataset()])  # the source's own ancestry is replaced
    (item,) = _build(source).SourceImageSequence
    assert item.ReferencedSOPClassUID == source.SOPClassUID
    assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
    (purpose,) = item.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("121322", "DCM")
    assert purpose.CodeMeaning == "Source image for image processing operation"
    assert item.SpatialLocationsPreserved == "YES"


def test_contributing_equipment_is_appended(source: Dataset) -> None:
    """Our ContributingEquipmentSequence item (Processing Equipment) follows the source's items."""
    earlier = Dataset()
    earlier.Manufacturer = "Earlier Vendor"
    source.ContributingEquipmentSequence = Sequence([earlier])
    out = _build(source)
    first, ours = out.ContributingEquipmentSequence
    assert first.Manufacturer == "Earlier Vendor"
    assert (ours.Manufacturer, ours.ManufacturerModelName, ours.SoftwareVersions) == (
        "mr2nst",
        "mr2nst",
        "0.1.0",
    )
    assert ours.StationName == "MR2NST"
    assert ours.ContributionDateTime == "20240506070809.123456+0000"
    assert ours.ContributionDescription == PROVENANCE.describe()
    (purpose,) = ours.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "109103",
        "DCM",
        "Processing Equipment",
    )
    assert len(source.ContributingEquipmentSequence) == 1  # the source is not modified


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_pixels_in_target_range_and_source_photometry(photometric: str) -> None:
    """The output has the target bit depth, the source's photometry and a window in range."""
    source = make_mg(photometric=photometric, bits_stored=12)
    rng = StoredRange.full(14, invert=photometric == "MONOCHROME1")
    stored = _stored(source, rng)
    out = build_derived(
        source,
        stored,
        rng,
        PROVENANCE,
        fingerprint="f",
        settings=DerivedSection(),
        equipment=EQUIPMENT,
        now=NOW,
    )
    assert (out.BitsStored, out.HighBit, out.BitsAllocated) == (14, 13, 16)
    assert out.PhotometricInterpretation == photometric
    np.testing.assert_array_equal(decode_stored(out), stored)
    center, width = float(out.WindowCenter), float(out.WindowWidth)
    assert center - width / 2 >= 0 and center + width / 2 <= rng.max_value + 1
    np.testing.assert_allclose(decode(out).image, decode(source).image, atol=1e-3)


def test_instance_dates_are_new_content_dates_are_kept(source: Dataset) -> None:
    """InstanceCreation* is `now` in the source's time zone; Content/Series dates are kept."""
    source.TimezoneOffsetFromUTC = "+0200"
    out = _build(source)
    assert (out.InstanceCreationDate, out.InstanceCreationTime) == ("20240506", "090809.123456")
    assert (
        out.ContributingEquipmentSequence[-1].ContributionDateTime == "20240506090809.123456+0200"
    )
    assert (out.ContentDate, out.ContentTime) == (source.ContentDate, source.ContentTime)
    assert (out.SeriesDate, out.SeriesTime) == (source.SeriesDate, source.SeriesTime)


@pytest.mark.parametrize(
    ("syntax", "method"), [(JPEG2000, "ISO_15444_1"), (JPEGLSNearLossless, "ISO_14495_1")]
)
def test_lossy_source_is_flagged_lossy(syntax: str, method: str) -> None:
    """A once-lossy source gives LossyImageCompression 01 with the ratio and method."""
    reason = can_encode(syntax)
    if reason:
        pytest.skip(f"cannot create {syntax} test data here: {reason}")
    out = _build(make_mg(transfer_syntax=syntax))
    assert out.LossyImageCompression == "01"
    assert _last(out.LossyImageCompressionMethod) == method
    assert float(_last(out.LossyImageCompressionRatio)) > 1.0
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_lossy_flag_is_never_reset_and_lossless_stays_lossless() -> None:
    """An earlier lossy step stays flagged; a lossless source stays 00 with no ratio or method."""
    lossy = make_mg(
        LossyImageCompression="01",
        LossyImageCompressionRatio=10,
        LossyImageCompressionMethod="ISO_10918_1",
    )
    out = _build(lossy)
    assert (out.LossyImageCompression, float(out.LossyImageCompressionRatio)) == ("01", 10.0)
    assert out.LossyImageCompressionMethod == "ISO_10918_1"
    if not can_encode(JPEG2000Lossless):
        clean = _build(make_mg(transfer_syntax=JPEG2000Lossless))
        assert clean.LossyImageCompression == "00"
        assert (
            "LossyImageCompressionRatio" not in clean and "LossyImageCompressionMethod" not in clean
        )


def test_drops_stale_and_keeps_private(source: Dataset) -> None:
    """Icon, signatures, MACs, SOP authorization go; private tags stay; the source is intact."""
    source.IconImageSequence = Sequence([Dataset()])
    source.DigitalSignaturesSequence = Sequence([Dataset()])
    source.MACParametersSequence = Sequence([Dataset()])
    source.SOPInstanceStatus = "AO"
    block = source.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "kept value")
    before = copy.deepcopy(source)
    out = _build(source)
    for keyword in (
        "IconImageSequence",
        "DigitalSignaturesSequence",
        "MACParametersSequence",
        "SOPInstanceStatus",
    ):
        assert keyword not in out, keyword
    assert out.private_block(0x0009, "ACME 1.0")[0x10].value == "kept value"
    assert source == before


def test_file_meta_and_writable(source: Dataset, tmp_path: Path) -> None:
    """The output has consistent file meta and survives dcmwrite and dcmread."""
    out = _build(source)
    meta = out.file_meta
    assert meta.MediaStorageSOPClassUID == out.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationVersionName == "MR2NST_0.1.0"
    path = tmp_path / "out.dcm"
    dcmwrite(path, out, enforce_file_format=True)
    back = dcmread(path)
    assert back.SOPInstanceUID == out.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, decode_stored(out))


def test_deterministic_output(source: Dataset) -> None:
    """Same inputs and `now` give identical bytes; another `now` changes only timestamps."""
    first, second = _bytes(_build(source)), _bytes(_build(copy.deepcopy(source)))
    assert first == second
    a, b = _build(source), _build(source, now=NOW + timedelta(hours=3))
    differing = {elem.keyword for elem in a if elem.tag not in b or b[elem.tag] != elem}
    assert differing == {"InstanceCreationTime", "ContributingEquipmentSequence"}
    item_a, item_b = a.ContributingEquipmentSequence[-1], b.ContributingEquipmentSequence[-1]
    assert {e.keyword for e in item_a if item_b[e.tag] != e} == {"ContributionDateTime"}


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_sources_in_other_encodings(syntax: str) -> None:
    """Sources read as implicit VR or big endian give a correct Explicit VR LE output."""
    reason = can_encode(syntax)
    if reason:
        pytest.skip(f"cannot create {syntax} test data here: {reason}")
    plain, source = (
        make_mg(sop_uid=TEST_ROOT + "5", series_uid=TEST_ROOT + "6", study_uid=TEST_ROOT + "8")
        for _ in range(2)
    )
    for ds in (plain, source):
        ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x10, "US", 513)
    source = recode(source, syntax)
    assert source.file_meta.TransferSyntaxUID == syntax
    back = dcmread(io.BytesIO(_bytes(_build(source))))
    reference = dcmread(io.BytesIO(_bytes(_build(plain))))
    assert back.ViewCodeSequence[0].CodeMeaning == "cranio-caudal"
    assert back.PixelIntensityRelationshipSign == 1
    assert back.SOPInstanceUID == reference.SOPInstanceUID
    np.testing.assert_array_equal(back.pixel_array, reference.pixel_array)
    assert back[0x00091010].value in (513, b"\x01\x02")  # implicit VR: unknown private -> UN


def test_missing_source_uid_is_rejected(source: Dataset) -> None:
    """A source without SOPInstanceUID raises UnsupportedImageError naming the attribute."""
    del source.SOPInstanceUID
    with pytest.raises(UnsupportedImageError, match="SOPInstanceUID"):
        _build(source)


@needs_dciodvfy
@pytest.mark.parametrize(
    ("kwargs", "valid_source"),
    [
        ({}, True),
        ({"photometric": "MONOCHROME1", "bits_stored": 14}, True),
        ({"sop_class": DigitalMammographyXRayImageStorageForProcessing}, True),
        ({"transfer_syntax": JPEG2000}, True),
        ({"sop_class": DigitalXRayImageStorageForPresentation, "Modality": "DX"}, False),
    ],
    ids=["mg-mono2", "mg-mono1", "mg-processing", "mg-j2k-lossy", "dx"],
)
def test_iod_validator_finds_no_new_errors(
    kwargs: dict[str, object], valid_source: bool, tmp_path: Path
) -> None:
    """dciodvfy reports no error on the derived instance that its source did not have."""
    syntax = kwargs.get("transfer_syntax")
    if isinstance(syntax, str) and can_encode(syntax):
        pytest.skip(can_encode(syntax))
    source = make_mg(**kwargs)  # type: ignore[arg-type]
    src_path, out_path = tmp_path / "source.dcm", tmp_path / "derived.dcm"
    dcmwrite(src_path, source, enforce_file_format=True)
    dcmwrite(out_path, _build(source), enforce_file_format=True)
    source_errors, derived_errors = iod_errors(src_path), iod_errors(out_path)
    if valid_source:
        assert source_errors == []  # the factory builds IOD-valid MG sources
    assert set(derived_errors) <= set(source_errors), derived_errors


def _raw_value(data: bytes, keyword: str) -> bytes:
    """The undecoded value bytes of a top-level element of an encoded file."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    ds = dcmread(io.BytesIO(data))
    elem = ds.get_item(tag_for_keyword(keyword))  # type: ignore[arg-type]
    assert isinstance(elem, RawDataElement), keyword
    return bytes(elem.value)


# (SpecificCharacterSet, PatientName bytes, StudyDescription bytes): each must reach the
# derived file byte for byte, with the same SpecificCharacterSet.
CHARSETS = {
    "latin-1": ("ISO_IR 100", "Müller^Zoë".encode("latin-1"), "Dépistage".encode("latin-1")),
    "utf-8": ("ISO_IR 192", "Müller^Zoë^李".encode(), "Dépistage 乳腺".encode()),
    "invalid-utf-8": ("ISO_IR 192", b"\xff\xfe\xc3", b"ok \xff\xfe\xc3"),
    "iso-2022-japanese": (
        ["", "ISO 2022 IR 87"],
        b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
        b"\x1b$B;3ED\x1b(B",
    ),
}


@pytest.mark.parametrize("name", list(CHARSETS))
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_copied_text_keeps_its_bytes_and_character_set(name: str, syntax: str) -> None:
    """PatientName (and other copied text) reaches the derived file with the source's bytes
    (invalid UTF-8 included) and the same SpecificCharacterSet; the node's own text stays
    valid in that character set."""
    from pydicom.dataelem import RawDataElement

    charset, name_bytes, study_bytes = CHARSETS[name]
    source = make_mg()
    source.SpecificCharacterSet = charset
    source.SeriesDescription = "L CC"
    del source.PatientName, source.StudyDescription
    source.file_meta.TransferSyntaxUID = syntax
    encoded = _bytes(source)
    # Put the exact bytes in as raw elements, then read the file back as the node does.
    buf = io.BytesIO()
    template = dcmread(io.BytesIO(encoded))
    for tag, vr, value in ((0x00100010, "PN", name_bytes), (0x00081030, "LO", study_bytes)):
        padded = value + b" " * (len(value) % 2)
        template._dict[Tag(tag)] = RawDataElement(  # type: ignore[index]
            Tag(tag), vr, len(padded), padded, 0, False, True
        )
    dcmwrite(buf, template, enforce_file_format=True)
    read = dcmread(io.BytesIO(buf.getvalue()))
    assert _raw_value(buf.getvalue(), "PatientName").rstrip(b" ") == name_bytes  # sanity
    derived = _bytes(_build(read))
    assert _raw_value(derived, "PatientName").rstrip(b" ") == name_bytes
    assert _raw_value(derived, "StudyDescription").rstrip(b" ") == study_bytes
    out = dcmread(io.BytesIO(derived))
    assert out.SpecificCharacterSet == read.SpecificCharacterSet
    # The node's own text decodes cleanly in the source's character set.
    assert str(out.SeriesDescription) == "L CC [UIH style, mr2NST]"
    assert str(out.DerivationDescription) == PROVENANCE.describe()
