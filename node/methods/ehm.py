"""Method ``ehm``: exact histogram matching to the selected references (the paper's baseline)."""

from __future__ import annotations

from mr2nst.core.intensity import FloatImage
from mr2nst.core.method import MethodResult, Provenance, SourceInfo
from mr2nst.node.methods.references import ReferenceMethod


class EhmMethod(ReferenceMethod):
    """Exact histogram specification of the breast to the pooled breast pixels of the references."""

    name = "ehm"

    def fingerprint(self) -> str:
        """Method, version, k and bank content: what changes this method's output."""
        return f"ehm-{self.version}-k{self.references}-bank{self.bank_id()}"

    def __call__(self, image: FloatImage, info: SourceInfo) -> MethodResult:
        """Normalize one image (unit floats in and out)."""
        selection = self.select(image, info)
        provenance = Provenance(
            method=self.name,
            engine_version=self.version,
            references=selection.uids(),
            notes=(f"breast area {selection.area_mm2:.0f} mm2",),
        )
        return MethodResult(
            image=self.match_tone(image, selection),
            provenance=provenance,
            target_range=self.bank.stats().stored_range,
        )
