"""DICOM pixel I/O: decode to the engine's float image and encode back."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
from dicom_factory import can_encode, make_mg, phantom_stored
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from mr2nst.core.intensity import StoredRange
from mr2nst.node.dicom.codes import code_item
from mr2nst.node.dicom.pixels import (
    decode,
    decode_stored,
    encode_into,
    output_range,
    source_info,
    window_for,
)
from mr2nst.node.dicom.sopclasses import (
    ACCEPTED_TRANSFER_SYNTAXES,
    NORMALIZABLE_SOP_CLASSES,
    OUTPUT_TRANSFER_SYNTAX,
)
from mr2nst.node.errors import PixelError, UnsupportedImageError

PHI = ("Doe", "Jane", "PID-12345", "19600101", "ACC-98765")
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


def _with_extremes(bits: int, photometric: str) -> np.ndarray:
    arr = phantom_stored(64, 48, bits, photometric)
    arr[0, 0], arr[0, 1] = 0, 2**bits - 1
    return arr


def _window_bounds(ds: Dataset) -> tuple[float, float]:
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    return center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2


def _require_encoder(syntax: str) -> None:
    reason = can_encode(syntax)
    if reason:
        pytest.skip(f"cannot create {syntax} test data here: {reason}")


@pytest.mark.parametrize("bits", [12, 14, 16])
@pytest.mark.parametrize("photometric", PHOTOMETRICS)
def test_round_trip_is_exact(bits: int, photometric: str) -> None:
    """decode -> from_unit -> encode_into reproduces every stored value and the bit depth."""
    pixels = _with_extremes(bits, photometric)
    ds = make_mg(bits_stored=bits, photometric=photometric, pixels=pixels)
    decoded = decode(ds)
    stored = decoded.stored_range.from_unit(decoded.image)
    np.testing.assert_array_equal(stored, pixels)
    out = copy.deepcopy(ds)
    encode_into(out, stored, decoded.stored_range)
    assert (out.BitsStored, out.HighBit, out.BitsAllocated) == (bits, bits - 1, 16)
    assert out.PhotometricInterpretation == photometric
    np.testing.assert_array_equal(decode_stored(out), pixels)


def test_decoded_image_is_unit_float_brighter_is_denser() -> None:
    """The same anatomy stored as MONOCHROME1 and MONOCHROME2 decodes to the same float image."""
    mono1 = decode(make_mg(photometric="MONOCHROME1", bits_stored=14))
    mono2 = decode(make_mg(photometric="MONOCHROME2", bits_stored=14))
    assert mono2.image.dtype == np.float32 and mono2.image.shape == (64, 48)
    assert float(mono2.image.min()) >= 0.0 and float(mono2.image.max()) <= 1.0
    np.testing.assert_allclose(mono1.image, mono2.image, atol=1e-6)
    assert mono1.stored_range == StoredRange.full(14, invert=True)
    assert mono2.stored_range == StoredRange.full(14, invert=False)
    assert float(mono2.image[32, 0]) > float(mono2.image[32, 47])  # tissue at the chest wall


@pytest.mark.parametrize(
    "syntax",
    [
        JPEG2000Lossless,
        JPEGLSLossless,
        RLELossless,
        JPEGLossless,
        JPEGLosslessSV1,
        DeflatedExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
    ],
)
@pytest.mark.parametrize("bits", [12, 16])
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(syntax: str, bits: int) -> None:
    """Every lossless accepted syntax decodes to exactly the pixels it was encoded from."""
    _require_encoder(syntax)
    reference = make_mg(bits_stored=bits).pixel_array
    ds = make_mg(bits_stored=bits, transfer_syntax=syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    stored = decode_stored(ds)
    assert stored.dtype == np.uint16 and stored.dtype.isnative
    np.testing.assert_array_equal(stored, reference)


@pytest.mark.parametrize(
    ("syntax", "tolerance"), [(JPEG2000, 400), (JPEGLSNearLossless, 2), (JPEGExtended12Bit, 200)]
)
def test_lossy_syntaxes_decode_close_to_the_original(syntax: str, tolerance: int) -> None:
    """Lossy syntaxes decode, within the codec's error, to the original pixels."""
    _require_encoder(syntax)
    reference = make_mg().pixel_array.astype(np.int32)
    stored = decode_stored(make_mg(transfer_syntax=syntax)).astype(np.int32)
    assert stored.shape == reference.shape
    assert int(np.abs(stored - reference).max()) <= tolerance


def test_every_accepted_syntax_has_an_available_decoder() -> None:
    """The SCP never accepts a transfer syntax that this installation cannot decode."""
    for syntax in ACCEPTED_TRANSFER_SYNTAXES:
        assert get_decoder(syntax).is_available, syntax.name
    assert ExplicitVRLittleEndian == OUTPUT_TRANSFER_SYNTAX
    assert OUTPUT_TRANSFER_SYNTAX in ACCEPTED_TRANSFER_SYNTAXES
    assert len(NORMALIZABLE_SOP_CLASSES) == 4


def test_multi_frame_is_rejected() -> None:
    """A multi-frame instance raises UnsupportedImageError that says multi-frame."""
    ds = make_mg()
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    with pytest.raises(UnsupportedImageError, match="multi-frame"):
        decode(ds)


def test_rgb_is_rejected() -> None:
    """A three-sample (RGB) image raises UnsupportedImageError."""
    ds = make_mg()
    ds.set_pixel_data(np.zeros((8, 8, 3), np.uint8), "RGB", 8, generate_instance_uid=False)
    with pytest.raises(UnsupportedImageError, match="monochrome"):
        decode(ds)


def test_missing_pixel_data_is_rejected() -> None:
    """An instance without PixelData raises UnsupportedImageError."""
    ds = make_mg()
    del ds.PixelData
    with pytest.raises(UnsupportedImageError, match="no pixel data"):
        decode(ds)


def test_signed_pixels_are_rejected() -> None:
    """PixelRepresentation 1 is rejected clearly instead of being reinterpreted."""
    ds = make_mg()
    ds.PixelRepresentation = 1
    with pytest.raises(UnsupportedImageError, match="signed"):
        decode(ds)


def test_truncated_native_data_is_a_pixel_error() -> None:
    """Truncated uncompressed pixel data raises PixelError without patient data in the message."""
    ds = make_mg()
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(PixelError, match="cannot decode") as info:
        decode(ds)
    assert not isinstance(info.value, UnsupportedImageError)
    assert not any(word in str(info.value) for word in PHI)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless])
def test_corrupt_compressed_data_is_a_pixel_error(syntax: str) -> None:
    """A compressed frame that is not a valid codestream raises PixelError naming the syntax."""
    _require_encoder(syntax)
    ds = make_mg(transfer_syntax=syntax)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([bytes(len(frame))])
    with pytest.raises(PixelError, match="cannot decode") as info:
        decode(ds)
    assert ds.file_meta.TransferSyntaxUID.name in str(info.value)
    assert not any(word in str(info.value) for word in PHI)


def test_unknown_transfer_syntax_is_a_pixel_error() -> None:
    """An unknown transfer syntax raises PixelError, not a library exception."""
    ds = make_mg()
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    with pytest.raises(PixelError, match="1.2.3.4.5"):
        decode(ds)


def test_values_above_bits_stored_are_a_pixel_error() -> None:
    """Compressed data holding values beyond BitsStored is reported instead of clipped."""
    _require_encoder(JPEG2000Lossless)
    pixels = np.full((64, 48), 40000, np.uint16)
    ds = make_mg(bits_stored=16, pixels=pixels, transfer_syntax=JPEG2000Lossless)
    ds.BitsStored, ds.HighBit = 12, 11
    with pytest.raises(PixelError, match="exceed BitsStored"):
        decode(ds)


@pytest.mark.parametrize("photometric", PHOTOMETRICS)
def test_window_is_recomputed_inside_the_range_and_skips_background(photometric: str) -> None:
    """The new window lies inside the output range and excludes the flat background."""
    ds = make_mg(bits_stored=12, photometric=photometric)
    rng = StoredRange.full(14, invert=photometric == "MONOCHROME1")
    unit = decode(ds).image
    stored = rng.from_unit(unit)
    encode_into(ds, stored, rng)
    lo, hi = _window_bounds(ds)
    assert 0 <= lo < hi <= rng.max_value
    background = int(stored[0, -1])  # far corner, outside the breast
    assert not lo <= background <= hi
    tissue = stored[unit > 0.1]
    assert lo <= np.percentile(tissue, 50) <= hi
    assert float(ds.WindowWidth) >= 1
    assert ds.WindowCenterWidthExplanation == "MR2NST AUTO"


def test_window_without_background_uses_all_pixels() -> None:
    """An image with no background is windowed over all its pixels; a flat one gets width 1."""
    rng = StoredRange.full(12)
    ramp = np.tile(np.arange(1000, 3000, 2, dtype=np.uint16), (10, 1))
    center, width = window_for(ramp, rng)
    assert center - width / 2 >= 1000 and center + width / 2 <= 3001
    assert width > 1800
    assert window_for(np.full((4, 4), 7, np.uint16), rng) == (7.5, 1.0)


def test_encode_removes_stale_luts_and_writes_uncompressed() -> None:
    """encode_into drops stale LUTs/padding/icon, resets rescale and writes Explicit VR LE."""
    _require_encoder(RLELossless)
    ds = make_mg(transfer_syntax=RLELossless)
    lut = Dataset()
    lut.LUTDescriptor, lut.LUTData = [2, 0, 16], [0, 1]
    ds.VOILUTSequence = Sequence([copy.deepcopy(lut)])
    ds.ModalityLUTSequence = Sequence([lut])
    ds.VOILUTFunction = "SIGMOID"
    ds.WindowCenter, ds.WindowWidth = [100, 200], [50, 60]
    ds.PixelPaddingValue = 0
    ds.IconImageSequence = Sequence([Dataset()])
    ds.RescaleIntercept = 5
    rng = StoredRange.full(12)
    stored = np.full((32, 24), 1234, np.uint16)
    encode_into(ds, stored, rng)
    for keyword in (
        "VOILUTSequence",
        "ModalityLUTSequence",
        "VOILUTFunction",
        "PixelPaddingValue",
        "IconImageSequence",
    ):
        assert keyword not in ds, keyword
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope), ds.RescaleType) == (0.0, 1.0, "US")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PixelRepresentation) == (32, 24, 1, 0)
    assert ds["PixelData"].VR == "OW" and len(ds.PixelData) == 32 * 24 * 2
    assert float(ds.WindowCenter) == 1234.5 and float(ds.WindowWidth) == 1.0
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    np.testing.assert_array_equal(dcmread(io.BytesIO(buf.getvalue())).pixel_array, stored)


def test_encode_for_processing_sets_no_window() -> None:
    """For Processing images get no VOI window (their IOD forbids one)."""
    ds = make_mg(sop_class=DigitalMammographyXRayImageStorageForProcessing)
    ds.WindowCenter, ds.WindowWidth = 100, 50
    encode_into(ds, np.full((8, 8), 5, np.uint16), StoredRange.full(12))
    assert "WindowCenter" not in ds and "WindowWidth" not in ds


def test_encode_rejects_bad_input() -> None:
    """Out-of-range values, floats and a range that contradicts the photometry raise PixelError."""
    ds = make_mg(photometric="MONOCHROME2")
    with pytest.raises(PixelError, match="outside"):
        encode_into(ds, np.full((4, 4), 5000, np.uint16), StoredRange.full(12))
    with pytest.raises(PixelError, match="integers"):
        encode_into(ds, np.zeros((4, 4), np.float32), StoredRange.full(12))
    with pytest.raises(PixelError, match="contradicts"):
        encode_into(ds, np.zeros((4, 4), np.uint16), StoredRange.full(12, invert=True))
    np.testing.assert_array_equal(ds.pixel_array, make_mg().pixel_array)  # left untouched


def test_output_range_keeps_source_photometry() -> None:
    """output_range takes the target's levels but the source's MONOCHROME1 inversion."""
    decoded = decode(make_mg(photometric="MONOCHROME1"))
    target = StoredRange(bits_stored=14, low=100.0, high=15000.0, invert=False)
    assert output_range(decoded, target) == StoredRange(14, 100.0, 15000.0, invert=True)
    assert output_range(decoded, None) == decoded.stored_range


def test_source_info_reads_view_laterality_spacing_manufacturer() -> None:
    """SourceInfo comes from the view code, ImageLaterality, ImagerPixelSpacing and Manufacturer."""
    info = decode(make_mg()).info
    assert (info.view, info.laterality, info.pixel_spacing_mm) == ("CC", "L", (0.1, 0.1))
    assert info.manufacturer == "GE MEDICAL SYSTEMS"
    ds = make_mg(ImageLaterality=None, Laterality="R", PixelSpacing=[0.07, 0.08])
    ds.ViewCodeSequence = Sequence([code_item("399368009", "SCT", "medio-lateral oblique")])
    info = source_info(ds)
    assert (info.view, info.laterality, info.pixel_spacing_mm) == ("MLO", "R", (0.07, 0.08))
    ds.ViewPosition = "ML"
    ds.ViewCodeSequence = Sequence([code_item("X", "99LOCAL", "latero-medial")])
    assert source_info(ds).view == "ML"
    del ds.ViewPosition
    assert source_info(ds).view == "LM"
    empty = source_info(Dataset())
    assert (empty.view, empty.laterality, empty.pixel_spacing_mm) == ("", "", None)
