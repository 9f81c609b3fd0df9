"""Reading one target-domain DICOM file into a bank entry (or a clear rejection)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
)

from mr2nst.core.errors import ImageError
from mr2nst.core.segmentation import segment_breast

from .dicom_image import decode, text_of
from .errors import PixelError, RejectedFile
from .manifest import UNIT_SCALE, Entry, uid_problem
from .stats import histogram_of

MAMMOGRAPHY_SOP_CLASSES = (
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
)
VIEWS = ("CC", "MLO")  # the views mr2NST selects references by


@dataclass(frozen=True)
class Ingested:
    entry: Entry
    image: npt.NDArray[np.uint16]
    mask: npt.NDArray[np.bool_]


def ingest_file(path: Path) -> Ingested:
    """Read, check, segment and summarise one file; raises RejectedFile with the reason."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        raise RejectedFile(f"not a readable DICOM file ({exc.__class__.__name__})") from None
    modality, sop_class = text_of(ds, "Modality"), text_of(ds, "SOPClassUID")
    if modality != "MG" or sop_class not in MAMMOGRAPHY_SOP_CLASSES:
        raise RejectedFile(
            f"not a digital mammogram (Modality={modality or '?'}, SOP class {sop_class or '?'})"
        )
    uid = text_of(ds, "SOPInstanceUID")
    if not uid:
        raise RejectedFile("no SOPInstanceUID")
    problem = uid_problem(uid)
    if problem:  # the UID names the bank's files: nothing unsafe becomes a path
        raise RejectedFile(f"{problem}; the bank names its files after it")
    try:
        decoded = decode(ds)
    except PixelError as exc:
        raise RejectedFile(str(exc)) from None
    info = decoded.info
    if not info.view:
        raise RejectedFile("no view (ViewPosition or ViewCodeSequence)")
    if info.view not in VIEWS:
        raise RejectedFile(f"view {info.view} is not one mr2NST uses ({', '.join(VIEWS)})")
    if not info.laterality:
        raise RejectedFile("no laterality (ImageLaterality or Laterality)")
    if info.pixel_spacing_mm is None:
        raise RejectedFile(
            "no pixel spacing (PixelSpacing or ImagerPixelSpacing): breast area needs mm"
        )
    try:
        seg = segment_breast(decoded.image, info.view)
    except ImageError as exc:
        raise RejectedFile(f"no breast found ({exc})") from None
    image = np.rint(np.clip(decoded.image, 0.0, 1.0) * UNIT_SCALE).astype(np.uint16)
    entry = Entry(
        sop_instance_uid=uid,
        view=info.view,
        laterality=info.laterality,
        chest_wall_left=seg.chest_wall_left,
        pixel_spacing_mm=info.pixel_spacing_mm,
        manufacturer=info.manufacturer,
        model=text_of(ds, "ManufacturerModelName"),
        bits_stored=decoded.stored_range.bits_stored,
        photometric=text_of(ds, "PhotometricInterpretation"),
        rows=int(image.shape[0]),
        columns=int(image.shape[1]),
        breast_area_mm2=round(seg.area_mm2(info.pixel_spacing_mm), 1),
        background=float(np.median(decoded.image[~seg.mask])) if (~seg.mask).any() else 0.0,
        histogram=histogram_of(decoded.image[seg.mask]),
        image_sha256=hashlib.sha256(image.tobytes()).hexdigest(),
        source=str(path),
        added_at=time.time(),
    )
    return Ingested(entry, image, seg.mask)
