"""The synthetic phantom as MG DICOM: vendor profiles and one builder per DICOM module.

Each vendor rendering of a case (:mod:`mr2nst.core.lab.phantom`) becomes a "Digital
Mammography X-Ray Image Storage - For Presentation" instance that passes dciodvfy
without errors:

- GE: the soft GE-like rendering ("GE MEDICAL SYSTEMS", "Senographe Pristina"), 12-bit,
  MONOCHROME2 by default, view codes in legacy SNOMED-RT ("SRT");
- UIH: the sharp UIH-like rendering of the *same* breast in the same geometry ("UIH",
  "uMammo 890i"), 14-bit, MONOCHROME1 by default, view codes in SNOMED CT ("SCT").

Every UID is derived from the seed, vendor and case index, so the same arguments give
identical datasets. Each vendor's rendering of a case is its own patient, study and
series (different vendors never share a study).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from mr2nst.core.intensity import StoredRange
from mr2nst.core.lab.phantom import PhantomCase, PhantomSpec
from mr2nst.node.dicom.codes import code_item

MG_FOR_PRESENTATION = DigitalMammographyXRayImageStorageForPresentation
DEFAULT_UID_SEED = "mr2nst-phantom"
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class VendorProfile:
    """How one vendor's phantom instances are labelled and stored."""

    key: str  # "GE" | "UIH"; also the output folder name (lower case)
    manufacturer: str
    model: str
    software: str
    station: str
    serial: str
    detector_type: str  # DICOM DetectorType
    detector_id: str
    coding_scheme: str  # "SRT" (legacy SNOMED-RT) or "SCT" (SNOMED CT) for view/anatomy codes
    bits_stored: int
    photometric: str
    filter_material: str
    series_description: str
    processing: str  # AcquisitionDeviceProcessingDescription


VENDORS: dict[str, VendorProfile] = {
    "GE": VendorProfile(
        key="GE",
        manufacturer="GE MEDICAL SYSTEMS",
        model="Senographe Pristina",
        software="ADS_58.21",
        station="PRISTINA01",
        serial="PH0000GE001",
        detector_type="SCINTILLATOR",
        detector_id="GEDET0001",
        coding_scheme="SRT",
        bits_stored=12,
        photometric="MONOCHROME2",
        filter_material="RHODIUM",
        series_description="Phantom GE-like mammography",
        processing="FineView phantom-soft",
    ),
    "UIH": VendorProfile(
        key="UIH",
        manufacturer="UIH",
        model="uMammo 890i",
        software="R002.3.1",
        station="UMAMMO01",
        serial="PH0000UIH001",
        detector_type="DIRECT",
        detector_id="UIHDET0001",
        coding_scheme="SCT",
        bits_stored=14,
        photometric="MONOCHROME1",
        filter_material="RHODIUM",
        series_description="Phantom UIH-like mammography",
        processing="uAI phantom-sharp",
    ),
}

# View and anatomy codes. GE is labelled with the legacy SNOMED-RT ("SRT") codes that
# older mammography devices still write, UIH with current SNOMED CT ("SCT") codes, so that
# readers meet both in the wild. ViewPosition carries "CC"/"MLO" in either case.
_CODES: dict[str, dict[str, tuple[str, str]]] = {
    "SRT": {
        "CC": ("R-10242", "cranio-caudal"),
        "MLO": ("R-10226", "medio-lateral oblique"),
        "BREAST": ("T-04000", "Breast"),
    },
    "SCT": {
        "CC": ("399162004", "cranio-caudal"),
        "MLO": ("399368009", "medio-lateral oblique"),
        "BREAST": ("76752008", "Breast"),
    },
}
_POSITIONER_ANGLE = {"CC": 0.0, "MLO": 45.0}


def vendor_profile(vendor: str) -> VendorProfile:
    """The profile of ``vendor`` ("GE" or "UIH", any case); ValueError if unknown."""
    profile = VENDORS.get(vendor.upper())
    if profile is None:
        raise ValueError(f"unknown phantom vendor {vendor!r}; expected one of {sorted(VENDORS)}")
    return profile


def _uid(uid_seed: str, case: PhantomCase, vendor: str, index: int, kind: str) -> str:
    return str(generate_uid(entropy_srcs=[uid_seed, str(case.spec.seed), vendor, str(index), kind]))


def _patient_orientation(view: str, laterality: str) -> list[str]:
    """Row and column directions: the nipple points away from the chest wall (A or P)."""
    if laterality == "L":  # chest wall at column 0: columns run towards the nipple
        return ["A", "R"] if view == "CC" else ["A", "FR"]
    return ["P", "L"] if view == "CC" else ["P", "FL"]


def stored_pixels(
    case: PhantomCase, vendor: str, bits_stored: int, photometric: str
) -> npt.NDArray[np.uint16]:
    """The vendor rendering of ``case`` as stored values (MONOCHROME1 inverted)."""
    image = case.ge if vendor_profile(vendor).key == "GE" else case.uih
    srange = StoredRange.full(bits_stored, invert=photometric == "MONOCHROME1")
    return np.asarray(srange.from_unit(image), dtype=np.uint16)


def _window(stored: npt.NDArray[np.uint16], mask: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """Window centre and width covering the breast (0.5..99.5 percentiles)."""
    values = stored[mask] if mask.any() else stored.ravel()
    lo, hi = np.percentile(values, [0.5, 99.5])
    width = max(float(hi - lo), 2.0)
    return float(round((lo + hi) / 2.0)), float(round(width))


@dataclass(frozen=True)
class _Instance:
    """What the module builders of one phantom instance share."""

    case: PhantomCase
    prof: VendorProfile
    bits: int
    photometric: str
    stored: npt.NDArray[np.uint16]
    index: int  # the patient index: patient number, dates and UIDs derive from it
    uid_seed: str

    @property
    def spec(self) -> PhantomSpec:
        return self.case.spec

    @property
    def number(self) -> int:
        return self.index + 1

    @property
    def when(self) -> dt.date:
        return dt.date(2024, 1, 8) + dt.timedelta(days=self.index % 3650)

    @property
    def date(self) -> str:
        return self.when.strftime("%Y%m%d")

    @property
    def time(self) -> str:
        return f"{8 + self.index % 9:02d}{(7 * self.index) % 60:02d}00"

    @property
    def age(self) -> int:
        return 40 + (self.spec.seed + self.index) % 35

    def uid(self, kind: str) -> str:
        return _uid(self.uid_seed, self.case, self.prof.key, self.index, kind)


def _sop_common(ds: Dataset, it: _Instance) -> None:
    """SOP Common: character set, SOP class and instance, creation time."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = it.uid("sop")
    ds.InstanceCreationDate = it.date
    ds.InstanceCreationTime = it.time


def _patient(ds: Dataset, it: _Instance) -> None:
    """Patient and Patient Study: one phantom patient per vendor and case."""
    ds.PatientName = f"PHANTOM^{it.prof.key}^{it.number:04d}"
    ds.PatientID = f"PH-{it.prof.key}-{it.number:04d}"
    ds.PatientBirthDate = (it.when - dt.timedelta(days=365 * it.age + 120)).strftime("%Y%m%d")
    ds.PatientSex = "F"
    ds.PatientAge = f"{it.age:03d}Y"


def _study(ds: Dataset, it: _Instance) -> None:
    """General Study."""
    ds.StudyInstanceUID = it.uid("study")
    ds.StudyDate = it.date
    ds.StudyTime = it.time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{it.number}"
    ds.AccessionNumber = f"PH{it.prof.key[0]}{it.number:06d}"
    ds.StudyDescription = "MAMMOGRAPHY SCREENING (PHANTOM)"


def _series(ds: Dataset, it: _Instance) -> None:
    """General, DX and Mammography Series."""
    ds.Modality = "MG"
    ds.SeriesInstanceUID = it.uid("series")
    ds.SeriesNumber = 1
    ds.SeriesDate = it.date
    ds.SeriesTime = it.time
    ds.SeriesDescription = f"{it.prof.series_description} {it.spec.laterality}{it.spec.view}"
    ds.BodyPartExamined = "BREAST"
    ds.PresentationIntentType = "FOR PRESENTATION"


def _frame_of_reference(ds: Dataset, it: _Instance) -> None:
    """Frame of Reference."""
    ds.FrameOfReferenceUID = it.uid("frame")
    ds.PositionReferenceIndicator = ""


def _equipment(ds: Dataset, it: _Instance) -> None:
    """General Equipment: the vendor's device."""
    ds.Manufacturer = it.prof.manufacturer
    ds.InstitutionName = "mr2nst Phantom Clinic"
    ds.StationName = it.prof.station
    ds.ManufacturerModelName = it.prof.model
    ds.DeviceSerialNumber = it.prof.serial
    ds.SoftwareVersions = it.prof.software


def _general_image(ds: Dataset, it: _Instance) -> None:
    """General Image and DX Image (without its pixel description)."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.AcquisitionDate = ds.ContentDate = it.date
    ds.AcquisitionTime = ds.ContentTime = it.time
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = _patient_orientation(it.spec.view, it.spec.laterality)
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower stored values mean less X-ray intensity (denser), as in MONOCHROME1.
    ds.PixelIntensityRelationshipSign = 1 if it.photometric == "MONOCHROME1" else -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "INVERSE" if it.photometric == "MONOCHROME1" else "IDENTITY"
    ds.QualityControlImage = "NO"
    ds.CalibrationImage = "NO"
    ds.AcquisitionDeviceProcessingDescription = it.prof.processing


def _image_pixel(ds: Dataset, it: _Instance) -> None:
    """Image Pixel: the stored values, uncompressed."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = it.photometric
    ds.Rows, ds.Columns = it.stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = it.bits
    ds.HighBit = it.bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = it.stored.tobytes()


def _voi_lut(ds: Dataset, it: _Instance) -> None:
    """VOI LUT: a window over the breast."""
    center, width = _window(it.stored, it.case.mask)
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.WindowCenterWidthExplanation = "BREAST"


def _detector(ds: Dataset, it: _Instance) -> None:
    """DX Detector: the vendor's detector and the pixel spacing."""
    spec = it.spec
    ds.DetectorType = it.prof.detector_type
    ds.DetectorConfiguration = "AREA"
    ds.DetectorID = it.prof.detector_id
    ds.DetectorActiveShape = "RECTANGLE"
    ds.DetectorActiveDimensions = [
        spec.height * spec.pixel_spacing_mm,
        spec.width * spec.pixel_spacing_mm,
    ]
    ds.ImagerPixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
    ds.PixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]


def _acquisition(ds: Dataset, it: _Instance) -> None:
    """X-Ray Acquisition Dose, Generation, Filtration and Grid, and the Acquisition Context."""
    ds.KVP = 29.0 if it.prof.key == "GE" else 30.0
    ds.ExposureTime = 1200
    ds.XRayTubeCurrent = 80
    ds.Exposure = 96
    ds.FilterMaterial = it.prof.filter_material
    ds.Grid = ["RECIPROCATING", "FOCUSED"]
    ds.FocalSpots = 0.3
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.AcquisitionContextSequence = DicomSequence([])


def _mammography_image(ds: Dataset, it: _Instance) -> None:
    """DX Positioning and Mammography Image: geometry, view, laterality and their codes."""
    spec, scheme = it.spec, it.prof.coding_scheme
    ds.DistanceSourceToDetector = 660.0 if it.prof.key == "GE" else 650.0
    # The breast support sits 20 mm above the detector.
    ds.DistanceSourceToPatient = float(ds.DistanceSourceToDetector) - 20.0
    ds.EstimatedRadiographicMagnificationFactor = round(
        float(ds.DistanceSourceToDetector) / float(ds.DistanceSourceToPatient), 4
    )
    ds.BodyPartThickness = 40.0 + (spec.seed % 300) / 10.0
    ds.CompressionForce = 100.0
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.PositionerPrimaryAngle = _POSITIONER_ANGLE[spec.view] * (1 if spec.laterality == "R" else -1)
    ds.ViewPosition = spec.view
    ds.ImageLaterality = spec.laterality
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.OrganExposed = "BREAST"
    breast, view = _CODES[scheme]["BREAST"], _CODES[scheme][spec.view]
    ds.AnatomicRegionSequence = DicomSequence([code_item(breast[0], scheme, breast[1])])
    view_item = code_item(view[0], scheme, view[1])
    view_item.ViewModifierCodeSequence = DicomSequence([])
    ds.ViewCodeSequence = DicomSequence([view_item])


#: The builders of :func:`phantom_dataset`, one per DICOM module (or group of small ones).
_MODULES = (
    _sop_common,
    _patient,
    _study,
    _series,
    _frame_of_reference,
    _equipment,
    _general_image,
    _image_pixel,
    _voi_lut,
    _detector,
    _acquisition,
    _mammography_image,
)


def _file_meta(ds: Dataset) -> FileMetaDataset:
    """File meta information for an uncompressed (Explicit VR Little Endian) ``ds``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MR2NST_PHANTOM"
    return meta


def phantom_dataset(
    case: PhantomCase,
    vendor: str,
    *,
    bits_stored: int | None = None,
    photometric: str | None = None,
    j2k: bool = False,
    patient_index: int = 0,
    uid_seed: str = DEFAULT_UID_SEED,
) -> Dataset:
    """One vendor rendering of ``case`` as a complete MG For Presentation dataset with file meta.

    Args:
        case: the phantom breast to render.
        vendor: "GE" or "UIH" (any case).
        bits_stored: stored bits (10..16); default: the vendor's (GE 12, UIH 14).
        photometric: "MONOCHROME1" or "MONOCHROME2"; default: the vendor's (GE
            MONOCHROME2, UIH MONOCHROME1).
        j2k: encode the pixels as JPEG 2000 lossless.
        patient_index: the case's index in its set; patient, dates and UIDs derive from it.
        uid_seed: the seed of every UID (with the case's seed, the vendor and the index).

    Returns:
        The dataset, its ``file_meta`` set.

    Raises:
        ValueError: an unknown vendor or photometric interpretation, or bits out of range.
    """
    prof = vendor_profile(vendor)
    bits = prof.bits_stored if bits_stored is None else bits_stored
    photo = prof.photometric if photometric is None else photometric
    if photo not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photo!r}")
    if not 10 <= bits <= 16:
        raise ValueError(f"bits_stored must be 10..16 for mammography, got {bits}")
    stored = stored_pixels(case, prof.key, bits, photo)
    instance = _Instance(case, prof, bits, photo, stored, patient_index, uid_seed)
    ds = Dataset()
    for build in _MODULES:
        build(ds, instance)
    ds.file_meta = _file_meta(ds)
    if j2k:
        ds.compress(
            JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False
        )
    return ds
