"""Method ``mr2nst``: the multi-resolution, multi-reference style transfer engine.

Per image: segment the breast, select the references from the bank (same view, nearest
breast area, mirrored), scale the source and each reference robustly to [0, 1] using the
percentiles of their breast pixels (METHOD.md "Intensities"), run the engine, then map
the result onto the target domain's robust range and background from the bank's
statistics. The engine (and its VGG19) is built once per worker process.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from mr2nst.bank.bank import Bank
from mr2nst.core.ehm import exact_histogram_match
from mr2nst.core.engine import Mr2nstEngine, Progress
from mr2nst.core.intensity import FloatImage
from mr2nst.core.method import MethodResult, Provenance, SourceInfo

from .method_ehm import bank_fingerprint, breast_area

ROBUST_PERCENTILES = (0.5, 99.5)

ProgressSink = Callable[[Progress], None]


def robust_unit(image: FloatImage, mask: npt.NDArray[np.bool_]) -> FloatImage:
    """``image`` rescaled so its breast pixels' robust range spans [0, 1] (clipped)."""
    values = image[mask] if mask.any() else image.ravel()
    low, high = (float(v) for v in np.percentile(values, ROBUST_PERCENTILES))
    if high - low < 1e-6:
        high = low + 1e-6
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


class Mr2nstMethod:
    """The node's adapter around :class:`~mr2nst.core.engine.Mr2nstEngine`."""

    name = "mr2nst"

    def __init__(self, engine: Mr2nstEngine, bank: Bank, references: int, allow_fewer: bool, version: str,
                 refiner_name: str = "") -> None:
        self.engine = engine
        self.bank = bank
        self.references = references
        self.allow_fewer = allow_fewer
        self.version = version
        self.refiner_name = refiner_name
        self.progress: ProgressSink | None = None  # set by the caller (worker log, CLI bar)

    def fingerprint(self) -> str:
        return f"mr2nst-{self.version}-{self.engine.fingerprint()}-k{self.references}-bank{bank_fingerprint(self.bank)}"

    def __call__(self, image: FloatImage, info: SourceInfo) -> MethodResult:
        mask, area, chest_left = breast_area(image, info)
        refs = self.bank.select(info.view, info.laterality, area, self.references,
                                chest_wall_left=chest_left, allow_fewer=self.allow_fewer)
        content = robust_unit(image, mask)
        styles = [robust_unit(r.image, r.mask) for r in refs]
        init = None
        if self.engine.config.init == "ehm":
            pooled = np.concatenate([s[r.mask] for s, r in zip(styles, refs, strict=True)])
            init = exact_histogram_match(content, mask, pooled, background=0.0)
        result = self.engine.transfer(content, mask, styles, background=0.0, init=init, progress=self.progress)
        stats = self.bank.stats()
        out = stats.low + result.image * np.float32(stats.high - stats.low)
        out[~mask] = np.float32(stats.background)
        cfg = self.engine.config
        notes = (f"patch {cfg.patch_size}", f"iterations {cfg.iterations}", f"alpha {cfg.alpha:g}",
                 f"lr {cfg.lr:g}", f"pooling {cfg.pooling}", f"init {cfg.init}",
                 f"refiner {self.refiner_name or 'untrained (average of scales)'}",
                 f"tiles {result.tiles_optimised} optimised/{result.tiles_skipped} background")
        provenance = Provenance(method=self.name, engine_version=self.version,
                                references=tuple(r.entry.sop_instance_uid for r in refs), scales=cfg.grids,
                                features=self.engine.weights_id, notes=notes)
        return MethodResult(image=np.clip(out, 0.0, 1.0).astype(np.float32), provenance=provenance,
                            target_range=stats.stored_range)
