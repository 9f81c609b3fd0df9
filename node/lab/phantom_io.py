"""Write the synthetic paired phantom as MG DICOM plus ground truth.

The phantom comes from :mod:`mr2nst.core.lab.phantom`.

Each case ``i`` is one synthetic breast drawn from the set's seed. It is written once per
vendor, as a "Digital Mammography X-Ray Image Storage - For Presentation" instance that
passes dciodvfy without errors:

- ``ge/case0000.dcm``: the soft GE-like rendering ("GE MEDICAL SYSTEMS",
  "Senographe Pristina"), 12-bit, MONOCHROME2 by default;
- ``uih/case0000.dcm``: the sharp UIH-like rendering of the *same* breast in the same
  geometry ("UIH", "uMammo 890i"), 14-bit, MONOCHROME1 by default: the true UIH
  rendering of ``ge/case0000.dcm``;
- ``truth/case0000_mask.png``: the breast mask (8-bit PNG, 255 inside);
- ``truth/case0000.json``: µC positions (row, col, diameter_px), masses (row, col,
  radius_px), view, laterality, pixel spacing, seed and the paired file names.

The defaults give the node both photometric interpretations to handle (GE sources are
MONOCHROME2, the UIH bank is MONOCHROME1); ``photometric`` and ``bits`` force one value
for every vendor. View and laterality cycle through LCC, RCC, LMLO, RMLO starting at an
offset taken from the seed, so any four consecutive cases cover all four.

Every UID is derived from the seed, vendor and case index, so the same arguments write
byte-identical files. Each vendor's rendering of a case is its own patient, study and
series (different vendors never share a study).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from mr2nst.core.intensity import StoredRange
from mr2nst.core.lab.phantom import PhantomCase, PhantomSpec, make_case
from mr2nst.node.dicom.codes import code_item

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
DEFAULT_UID_SEED = "mr2nst-phantom"
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
# (view, laterality) in the order cases cycle through them.
_GEOMETRIES = (("CC", "L"), ("CC", "R"), ("MLO", "L"), ("MLO", "R"))


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


def case_spec(index: int, *, seed: int = 0, size: tuple[int, int] = (2294, 1914)) -> PhantomSpec:
    """The spec of case ``index`` of a phantom set: its own seed, view and laterality."""
    view, laterality = _GEOMETRIES[(index + seed) % len(_GEOMETRIES)]
    case_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return PhantomSpec(
        height=size[0], width=size[1], view=view, laterality=laterality, seed=case_seed
    )


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

    ``bits_stored``/``photometric`` default to the vendor's (GE 12-bit MONOCHROME2, UIH
    14-bit MONOCHROME1). With ``j2k`` the pixels are JPEG 2000 lossless encoded.
    """
    prof = vendor_profile(vendor)
    bits = prof.bits_stored if bits_stored is None else bits_stored
    photo = prof.photometric if photometric is None else photometric
    if photo not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photo!r}")
    if not 10 <= bits <= 16:
        raise ValueError(f"bits_stored must be 10..16 for mammography, got {bits}")
    spec = case.spec
    stored = stored_pixels(case, prof.key, bits, photo)
    number = patient_index + 1

    def uid(kind: str) -> str:
        return _uid(uid_seed, case, prof.key, patient_index, kind)

    when = dt.date(2024, 1, 8) + dt.timedelta(days=patient_index % 3650)
    date = when.strftime("%Y%m%d")
    time = f"{8 + patient_index % 9:02d}{(7 * patient_index) % 60:02d}00"
    age = 40 + (spec.seed + patient_index) % 35
    thickness_mm = 40.0 + (spec.seed % 300) / 10.0

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = MG_FOR_PRESENTATION
    ds.SOPInstanceUID = uid("sop")
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = f"PH{prof.key[0]}{number:06d}"
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = prof.manufacturer
    ds.InstitutionName = "mr2nst Phantom Clinic"
    ds.ReferringPhysicianName = ""
    ds.StationName = prof.station
    ds.StudyDescription = "MAMMOGRAPHY SCREENING (PHANTOM)"
    ds.SeriesDescription = f"{prof.series_description} {spec.laterality}{spec.view}"
    ds.ManufacturerModelName = prof.model
    ds.PatientName = f"PHANTOM^{prof.key}^{number:04d}"
    ds.PatientID = f"PH-{prof.key}-{number:04d}"
    ds.PatientBirthDate = (when - dt.timedelta(days=365 * age + 120)).strftime("%Y%m%d")
    ds.PatientSex = "F"
    ds.PatientAge = f"{age:03d}Y"
    ds.BodyPartExamined = "BREAST"
    ds.KVP = 29.0 if prof.key == "GE" else 30.0
    ds.DistanceSourceToDetector = 660.0 if prof.key == "GE" else 650.0
    # The breast support sits 20 mm above the detector.
    ds.DistanceSourceToPatient = float(ds.DistanceSourceToDetector) - 20.0
    ds.ExposureTime = 1200
    ds.XRayTubeCurrent = 80
    ds.Exposure = 96
    ds.FilterMaterial = prof.filter_material
    ds.DeviceSerialNumber = prof.serial
    ds.SoftwareVersions = prof.software
    ds.ImagerPixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
    ds.Grid = ["RECIPROCATING", "FOCUSED"]
    ds.FocalSpots = 0.3
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.BodyPartThickness = thickness_mm
    ds.CompressionForce = 100.0
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.PositionerPrimaryAngle = _POSITIONER_ANGLE[spec.view] * (1 if spec.laterality == "R" else -1)
    ds.DetectorType = prof.detector_type
    ds.DetectorConfiguration = "AREA"
    ds.DetectorID = prof.detector_id
    ds.DetectorActiveShape = "RECTANGLE"
    ds.DetectorActiveDimensions = [
        spec.height * spec.pixel_spacing_mm,
        spec.width * spec.pixel_spacing_mm,
    ]
    ds.AcquisitionDeviceProcessingDescription = prof.processing
    ds.ViewPosition = spec.view
    ds.EstimatedRadiographicMagnificationFactor = round(
        float(ds.DistanceSourceToDetector) / float(ds.DistanceSourceToPatient), 4
    )
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.StudyID = f"{number}"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = _patient_orientation(spec.view, spec.laterality)
    ds.FrameOfReferenceUID = uid("frame")
    ds.PositionReferenceIndicator = ""
    ds.ImageLaterality = spec.laterality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photo
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [spec.pixel_spacing_mm, spec.pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship = "LOG"
    # +1: lower stored values mean less X-ray intensity (denser), as in MONOCHROME1.
    ds.PixelIntensityRelationshipSign = 1 if photo == "MONOCHROME1" else -1
    center, width = _window(stored, case.mask)
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.WindowCenterWidthExplanation = "BREAST"
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "INVERSE" if photo == "MONOCHROME1" else "IDENTITY"
    ds.QualityControlImage = "NO"
    ds.CalibrationImage = "NO"
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    ds.OrganExposed = "BREAST"
    ds.AcquisitionContextSequence = DicomSequence([])
    scheme = prof.coding_scheme
    breast, view = _CODES[scheme]["BREAST"], _CODES[scheme][spec.view]
    ds.AnatomicRegionSequence = DicomSequence([code_item(breast[0], scheme, breast[1])])
    view_item = code_item(view[0], scheme, view[1])
    view_item.ViewModifierCodeSequence = DicomSequence([])
    ds.ViewCodeSequence = DicomSequence([view_item])
    ds.PixelData = stored.tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MR2NST_PHANTOM"
    ds.file_meta = meta
    if j2k:
        ds.compress(
            JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False
        )
    return ds


def _truth(
    case: PhantomCase, files: dict[str, str], index: int, set_seed: int
) -> dict[str, object]:
    """The ground truth of one case; ``make_case(PhantomSpec(seed=..., ...))`` redraws it."""
    spec = case.spec
    return {
        "case": index,
        "set_seed": set_seed,
        "seed": spec.seed,
        "view": spec.view,
        "laterality": spec.laterality,
        "rows": spec.height,
        "columns": spec.width,
        "pixel_spacing_mm": spec.pixel_spacing_mm,
        "calcs": [[round(float(v), 3) for v in row] for row in case.calcs],
        "masses": [[round(float(v), 3) for v in row] for row in case.masses],
        "files": files,
    }


def write_phantom_set(
    out_dir: Path,
    n: int,
    *,
    size: tuple[int, int] = (2294, 1914),
    seed: int = 0,
    vendors: Sequence[str] = ("GE", "UIH"),
    photometric: str | None = None,
    bits: int | None = None,
    j2k: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Write ``n`` paired cases under ``out_dir``; return the DICOM files, case by case.

    ``photometric``/``bits`` of ``None`` keep each vendor's default (GE 12-bit
    MONOCHROME2, UIH 14-bit MONOCHROME1). Ground truth goes to ``out_dir/truth``.
    """
    if n < 0:
        raise ValueError(f"number of cases must be >= 0, got {n}")
    profiles = [vendor_profile(v) for v in vendors]
    if not profiles:
        raise ValueError("at least one vendor is needed")
    if photometric is not None and photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    out_dir = Path(out_dir)
    truth_dir = out_dir / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    for prof in profiles:
        (out_dir / prof.key.lower()).mkdir(parents=True, exist_ok=True)
    uid_seed = f"{DEFAULT_UID_SEED}-{seed}"
    written: list[Path] = []
    for index in _progress(range(n), progress, total=n):
        case = make_case(case_spec(index, seed=seed, size=size))
        name = f"case{index:04d}"
        files: dict[str, str] = {}
        for prof in profiles:
            ds = phantom_dataset(
                case,
                prof.key,
                bits_stored=bits,
                photometric=photometric,
                j2k=j2k,
                patient_index=index,
                uid_seed=uid_seed,
            )
            path = out_dir / prof.key.lower() / f"{name}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            files[prof.key] = f"{prof.key.lower()}/{name}.dcm"
            written.append(path)
        Image.fromarray(case.mask.astype(np.uint8) * 255).save(truth_dir / f"{name}_mask.png")
        (truth_dir / f"{name}.json").write_text(
            json.dumps(_truth(case, files, index, seed), indent=1) + "\n", encoding="utf-8"
        )
    return written


def _progress(items: Iterable[int], enabled: bool, total: int) -> Iterable[int]:
    if not enabled:
        return items
    from tqdm import tqdm

    bar: Iterable[int] = tqdm(items, total=total, desc="phantom", unit="case")
    return bar


def run_phantom_command(
    out: Path,
    n: int,
    size: tuple[int, int],
    seed: int,
    vendors: tuple[str, ...],
    j2k: bool,
    photometric: str | None,
    bits: int | None,
    progress: bool,
) -> list[Path]:
    """``mr2nst phantom``: write a paired phantom set; return the DICOM files written."""
    return write_phantom_set(
        out,
        n,
        size=size,
        seed=seed,
        vendors=vendors,
        photometric=photometric,
        bits=bits,
        j2k=j2k,
        progress=progress,
    )
