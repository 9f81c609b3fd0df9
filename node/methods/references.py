"""What every reference-based method does first: segment the breast, then choose references.

``ehm``, ``spectral`` and ``mr2nst`` all normalize towards the ``k`` bank references of the
same view with the nearest breast area (mirrored to the source's chest-wall side).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mr2nst.bank.bank import Bank
from mr2nst.bank.selection import Reference
from mr2nst.core.ehm import exact_histogram_match
from mr2nst.core.intensity import FloatImage
from mr2nst.core.method import SourceInfo
from mr2nst.core.segmentation import segment_breast
from mr2nst.node.errors import UnsupportedImageError

BoolImage = npt.NDArray[np.bool_]


def bank_fingerprint(bank: Bank) -> str:
    """A short hash of the bank's content, so output UIDs change when the references do."""
    digest = hashlib.sha256()
    for entry in sorted(bank.entries(), key=lambda e: e.sop_instance_uid):
        digest.update(f"{entry.sop_instance_uid}:{entry.image_sha256};".encode())
    return digest.hexdigest()[:12]


def breast_area(image: FloatImage, info: SourceInfo) -> tuple[BoolImage, float, bool]:
    """Segment the breast of a source image.

    Returns:
        (mask, breast area in mm², chest wall on the left).

    Raises:
        UnsupportedImageError: the image has no pixel spacing, so no area can be measured.
    """
    if info.pixel_spacing_mm is None:
        raise UnsupportedImageError(
            "no pixel spacing (PixelSpacing/ImagerPixelSpacing): cannot measure breast area"
        )
    seg = segment_breast(image, info.view)
    return seg.mask, seg.area_mm2(info.pixel_spacing_mm), seg.chest_wall_left


@dataclass(frozen=True)
class Selection:
    """A source's breast mask and area, and the references chosen for it."""

    mask: BoolImage
    area_mm2: float
    refs: list[Reference]

    def pooled(self) -> npt.NDArray[np.float32]:
        """The breast pixels of all references, pooled (the target histogram)."""
        return np.concatenate([r.image[r.mask] for r in self.refs])

    def uids(self) -> tuple[str, ...]:
        """The references' SOP Instance UIDs, for provenance."""
        return tuple(r.entry.sop_instance_uid for r in self.refs)


class ReferenceMethod:
    """Base of the methods that normalize a source towards references from the bank.

    Args:
        bank: the reference bank.
        references: how many references to select (``k``).
        allow_fewer: accept fewer than ``k`` when the bank has fewer of the view.
        version: the node version, part of the fingerprint.
    """

    name = "reference"

    def __init__(self, bank: Bank, references: int, allow_fewer: bool, version: str) -> None:
        self.bank = bank
        self.references = references
        self.allow_fewer = allow_fewer
        self.version = version

    def bank_id(self) -> str:
        """The bank's content hash (see :func:`bank_fingerprint`)."""
        return bank_fingerprint(self.bank)

    def select(self, image: FloatImage, info: SourceInfo) -> Selection:
        """Segment ``image`` and choose its references.

        Raises:
            UnsupportedImageError: no pixel spacing.
            NotEnoughReferences: the bank lacks references of this view.
        """
        mask, area, chest_left = breast_area(image, info)
        refs = self.bank.select(
            info.view,
            info.laterality,
            area,
            self.references,
            chest_wall_left=chest_left,
            allow_fewer=self.allow_fewer,
        )
        return Selection(mask, area, list(refs))

    def match_tone(self, image: FloatImage, selection: Selection) -> FloatImage:
        """``image``'s breast given the references' pooled histogram exactly (EHM)."""
        background = self.bank.stats().background
        return exact_histogram_match(
            image, selection.mask, selection.pooled(), background=background
        )
