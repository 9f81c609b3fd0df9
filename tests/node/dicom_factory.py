"""Tiny, IOD-valid Digital Mammography datasets for node tests.

``make_mg`` builds a single-frame MG (or DX) instance that passes ``dciodvfy`` without
errors for the For Presentation SOP class. The pixels are a smooth synthetic "breast"
(a half-ellipse against the chest wall over a flat background) so that tests can check
background handling. ``recode`` re-encodes it in another transfer syntax using a real
encoder: pydicom's own (RLE, J2K via pylibjpeg-openjpeg, deflate) or DCMTK's command line
tools (JPEG-LS, JPEG lossless, big endian) when those are installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
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
    generate_uid,
)

from mr2nst.core.intensity import StoredRange
from mr2nst.node.dicom.codes import code_item

TEST_ROOT = "1.2.826.0.1.3680043.10.543."  # an example root for test UIDs

# DCMTK tools that re-encode a file into a transfer syntax (argv without in/out paths).
DCMTK_ENCODERS: dict[str, list[str]] = {
    JPEGLSLossless: ["dcmcjpls", "+el"],
    JPEGLSNearLossless: ["dcmcjpls", "+en", "+md", "2"],
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGLossless: ["dcmcjpeg", "+el"],
    JPEGExtended12Bit: ["dcmcjpeg", "+ee"],  # lossy; 12 bits at most
    ExplicitVRBigEndian: ["dcmconv", "+tb"],
}
# Syntaxes pydicom can write itself (compression through its encoders).
PYDICOM_ENCODERS: dict[str, dict[str, Any]] = {
    RLELossless: {},
    JPEG2000Lossless: {"encoding_plugin": "pylibjpeg"},
    JPEG2000: {"encoding_plugin": "pylibjpeg", "j2k_cr": [4]},
}


def phantom_unit(rows: int, cols: int, seed: int = 0) -> npt.NDArray[np.float64]:
    """A unit-range image, brighter = denser: a noisy half-ellipse on a flat 0.0 background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cy, ry, rx = (rows - 1) / 2, rows * 0.45, cols * 0.8
    r2 = ((y - cy) / ry) ** 2 + (x / rx) ** 2
    inside = r2 < 1.0
    tissue = 0.25 + 0.5 * (1.0 - r2) + rng.normal(0.0, 0.03, size=(rows, cols))
    return np.where(inside, np.clip(tissue, 0.05, 1.0), 0.0)


def phantom_stored(
    rows: int, cols: int, bits_stored: int, photometric: str = "MONOCHROME2", seed: int = 0
) -> npt.NDArray[np.uint16]:
    """``phantom_unit`` as stored values over the full range of ``bits_stored``."""
    rng = StoredRange.full(bits_stored, invert=photometric == "MONOCHROME1")
    return rng.from_unit(phantom_unit(rows, cols, seed))


def make_mg(
    *,
    rows: int = 64,
    cols: int = 48,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    sop_class: str = DigitalMammographyXRayImageStorageForPresentation,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixels: npt.NDArray[np.integer] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Dataset:
    """A minimal, IOD-valid MG instance.

    Keyword ``overrides`` set (or, with None, delete) attributes.
    """
    arr = phantom_stored(rows, cols, bits_stored, photometric, seed) if pixels is None else pixels
    for_presentation = "PRESENTATION" in UID(sop_class).name.upper()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid(prefix=TEST_ROOT)
    # Patient, General Study (fake PHI, so tests can check it never leaks).
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-12345"
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid or generate_uid(prefix=TEST_ROOT)
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC-98765"
    ds.StudyDescription = "Screening mammography"
    # General Series, DX Series, Mammography Series.
    ds.Modality = "MG"
    ds.SeriesInstanceUID = series_uid or generate_uid(prefix=TEST_ROOT)
    ds.SeriesNumber = 7
    ds.SeriesDate = "20240102"
    ds.SeriesTime = "101600"
    ds.SeriesDescription = "L CC"
    ds.PresentationIntentType = "FOR PRESENTATION" if for_presentation else "FOR PROCESSING"
    # Frame of Reference, General Equipment.
    ds.FrameOfReferenceUID = generate_uid(prefix=TEST_ROOT)
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ManufacturerModelName = "Senographe Pristina"
    ds.InstitutionName = "Test Hospital"
    ds.StationName = "MAMMO1"
    ds.SoftwareVersions = "1.0"
    # General Image, DX Image, Mammography Image.
    ds.InstanceNumber = 1
    ds.ContentDate = "20240102"
    ds.ContentTime = "101700"
    ds.AcquisitionDate = "20240102"
    ds.AcquisitionTime = "101700"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PatientOrientation = ["A", "R"]
    ds.ImageLaterality = "L"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.BodyPartExamined = "BREAST"
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.DetectorType = "DIRECT"
    ds.QualityControlImage = "NO"
    ds.AnatomicRegionSequence = Sequence([code_item("76752008", "SCT", "Breast")])
    view = code_item("399162004", "SCT", "cranio-caudal")
    view.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view])
    ds.AcquisitionContextSequence = Sequence()
    ds.KVP = 29
    ds.Exposure = 60
    ds.DistanceSourceToDetector = 660
    ds.DistanceSourceToPatient = 640
    ds.EstimatedRadiographicMagnificationFactor = 660 / 640
    ds.OrganExposed = "BREAST"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    if for_presentation:
        top = 2**bits_stored - 1
        ds.WindowCenter = top / 2
        ds.WindowWidth = top
        ds.VOILUTFunction = "LINEAR"
    # Image Pixel.
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(
        np.asarray(arr, dtype=np.uint16), photometric, bits_stored, generate_instance_uid=False
    )
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if transfer_syntax != ExplicitVRLittleEndian:
        ds = recode(ds, transfer_syntax)
    return ds


def can_encode(transfer_syntax: str) -> str:
    """'' when ``recode`` can produce ``transfer_syntax`` here, else the reason it cannot."""
    if transfer_syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        return ""
    if transfer_syntax in PYDICOM_ENCODERS:
        from pydicom.pixels import get_encoder

        encoder = get_encoder(transfer_syntax)
        return "" if encoder.is_available else f"no pydicom encoder plugin for {transfer_syntax}"
    tool = DCMTK_ENCODERS.get(transfer_syntax)
    if tool is None:
        return f"no encoder known for {transfer_syntax}"
    return "" if shutil.which(tool[0]) else f"{tool[0]} (DCMTK) is not installed"


def recode(ds: Dataset, transfer_syntax: str, workdir: Path | None = None) -> Dataset:
    """``ds`` (explicit VR LE) re-encoded in ``transfer_syntax`` by a real encoder, read back."""
    import io
    import tempfile

    reason = can_encode(transfer_syntax)
    if reason:
        raise RuntimeError(reason)
    if transfer_syntax in PYDICOM_ENCODERS:
        ds.compress(
            transfer_syntax, generate_instance_uid=False, **PYDICOM_ENCODERS[transfer_syntax]
        )
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return dcmread(io.BytesIO(buf.getvalue()))
    if transfer_syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return dcmread(io.BytesIO(buf.getvalue()))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(src, enforce_file_format=True)
        subprocess.run(
            [*DCMTK_ENCODERS[transfer_syntax], str(src), str(dst)],
            check=True,
            capture_output=True,
        )
        return dcmread(dst)
