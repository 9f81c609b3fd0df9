"""Method ``spectral``: EHM, then the breast's radial power spectrum matched to the references'.

The strong non-neural competitor of mr2NST (no GPU, about a few seconds per image on a
CPU): exact histogram matching to the selected references as in ``ehm``, then a clipped,
radially symmetric frequency-domain gain that brings the breast's texture spectrum to
the references' mean, then exact histogram matching again (see :mod:`mr2nst.core.spectral`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from mr2nst.bank.bank import Bank
from mr2nst.core.intensity import FloatImage
from mr2nst.core.method import MethodResult, Provenance, SourceInfo
from mr2nst.core.spectral import SpectralConfig, radial_power, spectral_match
from mr2nst.node.methods.references import ReferenceMethod


class SpectralMethod(ReferenceMethod):
    """EHM plus a clipped spectral gain, both towards the same selected references."""

    name = "spectral"

    def __init__(
        self,
        bank: Bank,
        references: int,
        allow_fewer: bool,
        version: str,
        settings: SpectralConfig | None = None,
    ) -> None:
        super().__init__(bank, references, allow_fewer, version)
        self.settings = settings or SpectralConfig()
        # Radial power per reference image (keyed by UID and checksum; mirroring does not
        # change a radial spectrum), so a worker measures each reference once.
        self._powers: dict[tuple[str, str], npt.NDArray[np.float64]] = {}

    def fingerprint(self) -> str:
        """Method, version, k, settings and bank content: what changes this method's output."""
        return (
            f"spectral-{self.version}-k{self.references}"
            f"-{self.settings.describe().replace(' ', '-')}"
            f"-bank{self.bank_id()}"
        )

    def __call__(self, image: FloatImage, info: SourceInfo) -> MethodResult:
        """Normalize one image (unit floats in and out)."""
        selection = self.select(image, info)
        mask, area, refs = selection.mask, selection.area_mm2, selection.refs
        stats = self.bank.stats()
        matched = self.match_tone(image, selection)
        powers = []
        for r in refs:
            key = (r.entry.sop_instance_uid, r.entry.image_sha256)
            if key not in self._powers:
                self._powers[key] = radial_power(r.image, r.mask, self.settings)
            powers.append(self._powers[key])
        result = spectral_match(
            matched,
            mask,
            [(r.image, r.mask) for r in refs],
            self.settings,
            background=stats.background,
            reference_power=np.mean(powers, axis=0),
        )
        s = self.settings
        provenance = Provenance(
            method=self.name,
            engine_version=self.version,
            references=selection.uids(),
            notes=(
                f"breast area {area:.0f} mm2",
                f"gain {s.min_gain:g}-{s.max_gain:g}",
                f"cut-off {s.low_cutoff:g} cycles/px",
                f"bins {s.bins}",
                f"smooth {s.smooth_bins:g}",
                f"fill {s.fill_sigma:g} px",
                f"passes {s.iterations}",
                f"max gain applied {float(result.gain.max()):.2f}",
            ),
        )
        return MethodResult(
            image=result.image, provenance=provenance, target_range=stats.stored_range
        )
