"""Method ``ehm``: exact histogram matching to the selected references (the paper's baseline)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from mr2nst.bank.bank import Bank
from mr2nst.core.ehm import exact_histogram_match
from mr2nst.core.intensity import FloatImage
from mr2nst.core.method import MethodResult, Provenance, SourceInfo
from mr2nst.core.segmentation import segment_breast

from .errors import UnsupportedImageError


def bank_fingerprint(bank: Bank) -> str:
    """A short hash of the bank's content, so output UIDs change when the references do."""
    digest = hashlib.sha256()
    for entry in sorted(bank.entries(), key=lambda e: e.sop_instance_uid):
        digest.update(f"{entry.sop_instance_uid}:{entry.image_sha256};".encode())
    return digest.hexdigest()[:12]


def breast_area(image: FloatImage, info: SourceInfo) -> tuple[np.ndarray, float, bool]:
    """(mask, breast area in mm², chest wall on the left) of a source image."""
    if info.pixel_spacing_mm is None:
        raise UnsupportedImageError("no pixel spacing (PixelSpacing/ImagerPixelSpacing): cannot measure breast area")
    seg = segment_breast(image, info.view)
    return seg.mask, seg.area_mm2(info.pixel_spacing_mm), seg.chest_wall_left


def select_references(bank: Bank, image: FloatImage, info: SourceInfo, k: int,
                      allow_fewer: bool) -> tuple[np.ndarray, float, list[Any]]:
    """The preamble every reference-based method shares: (breast mask, breast area in mm²,
    the ``k`` references of the same view with the nearest breast area, mirrored)."""
    mask, area, chest_left = breast_area(image, info)
    refs = bank.select(info.view, info.laterality, area, k, chest_wall_left=chest_left,
                       allow_fewer=allow_fewer)
    return mask, area, list(refs)


class EhmMethod:
    """Exact histogram specification of the breast to the pooled breast pixels of the references."""

    name = "ehm"

    def __init__(self, bank: Bank, references: int, allow_fewer: bool, version: str) -> None:
        self.bank = bank
        self.references = references
        self.allow_fewer = allow_fewer
        self.version = version

    def fingerprint(self) -> str:
        return f"ehm-{self.version}-k{self.references}-bank{bank_fingerprint(self.bank)}"

    def __call__(self, image: FloatImage, info: SourceInfo) -> MethodResult:
        mask, area, refs = select_references(self.bank, image, info, self.references, self.allow_fewer)
        target = np.concatenate([r.image[r.mask] for r in refs])
        stats = self.bank.stats()
        out = exact_histogram_match(image, mask, target, background=stats.background)
        provenance = Provenance(method=self.name, engine_version=self.version,
                                references=tuple(r.entry.sop_instance_uid for r in refs),
                                notes=(f"breast area {area:.0f} mm2",))
        return MethodResult(image=out, provenance=provenance, target_range=stats.stored_range)
