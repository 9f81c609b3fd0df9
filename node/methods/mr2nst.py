"""Method ``mr2nst``: the multi-resolution, multi-reference style transfer engine.

Per image: segment the breast, select the references from the bank (same view, nearest
breast area, mirrored), scale the source and each reference robustly to [0, 1] using the
percentiles of their breast pixels (METHOD.md "Intensities"), run the engine, then map
the result onto the target domain's robust range and background from the bank's
statistics (``tone = "linear"``) or, with ``tone = "ehm"``, give the breast the selected
references' pooled breast histogram exactly (ranks from the transfer). The engine (and
its VGG) is built once per worker process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from mr2nst.bank.bank import Bank
from mr2nst.bank.selection import Reference
from mr2nst.core.ehm import exact_histogram_match
from mr2nst.core.engine import EngineConfig, EngineResult, Progress
from mr2nst.core.intensity import FloatImage, robust_unit
from mr2nst.core.method import MethodResult, Provenance, SourceInfo
from mr2nst.node.methods.references import ReferenceMethod, Selection

ProgressSink = Callable[[Progress], None]


class TransferEngine(Protocol):
    """What the method needs of an engine: a :class:`~mr2nst.core.engine.Mr2nstEngine`, or a
    wrapper of one (the evaluation records each call's result)."""

    @property
    def config(self) -> EngineConfig:
        """The engine's settings."""
        ...

    @property
    def weights_id(self) -> str:
        """The feature network's weights id, for provenance."""
        ...

    def fingerprint(self) -> str:
        """What changes the engine's output (settings and weights)."""
        ...

    def transfer(
        self,
        content: FloatImage,
        content_mask: npt.NDArray[np.bool_],
        references: Sequence[FloatImage],
        *,
        background: float = ...,
        init: FloatImage | None = ...,
        progress: ProgressSink | None = ...,
    ) -> EngineResult:
        """Transfer ``content`` to the style of ``references``."""
        ...


@dataclass(frozen=True)
class Prepared:
    """One source made ready for the engine: breast mask, selected references (mirrored),
    content and reference images in [0, 1], and the EHM start (``init = "ehm"``)."""

    mask: npt.NDArray[np.bool_]
    refs: list[Reference]
    content: FloatImage
    styles: list[FloatImage]
    init: FloatImage | None

    @property
    def start(self) -> FloatImage:
        """The image the transfer started from (detail mode takes its low band)."""
        return self.content if self.init is None else self.init


def _lever_notes(cfg: EngineConfig) -> tuple[str, ...]:
    """Provenance notes for the optional levers that are on."""
    notes = []
    if cfg.content_layers != ("relu4_2",):
        notes.append("content " + "+".join(cfg.content_layers))
    if cfg.pixel_weight:
        notes.append(f"pixel weight {cfg.pixel_weight:g}")
    if cfg.histogram_weight:
        notes.append(f"histogram weight {cfg.histogram_weight:g}")
    if cfg.optimizer != "adam" or cfg.lr_schedule != "constant":
        notes.append(f"optimizer {cfg.optimizer} {cfg.lr_schedule}")
    if cfg.detail_sigma:
        notes.append(f"detail sigma {cfg.detail_sigma:g}")
    return tuple(notes)


class Mr2nstMethod(ReferenceMethod):
    """The node's adapter around :class:`~mr2nst.core.engine.Mr2nstEngine`.

    Args:
        engine: the engine (built once per worker process).
        bank: the reference bank.
        references: how many references to select (``k``).
        allow_fewer: accept fewer than ``k`` when the bank has fewer of the view.
        version: the node version, part of the fingerprint.
        refiner_name: the trained refiner's file name, for provenance ("" = untrained).
    """

    name = "mr2nst"

    def __init__(
        self,
        engine: TransferEngine,
        bank: Bank,
        references: int,
        allow_fewer: bool,
        version: str,
        refiner_name: str = "",
    ) -> None:
        super().__init__(bank, references, allow_fewer, version)
        self.engine = engine
        self.refiner_name = refiner_name
        self.progress: ProgressSink | None = None  # set by the caller (worker log, CLI bar)
        # The evaluation sets keep_last to re-finish the last call's scales; a worker does
        # not, so no job's full-size images outlive it.
        self.keep_last = False
        self.last: tuple[Prepared, EngineResult] | None = None

    def fingerprint(self) -> str:
        """Method, version, engine settings and weights, k and bank content."""
        return (
            f"mr2nst-{self.version}-{self.engine.fingerprint()}"
            f"-k{self.references}-bank{self.bank_id()}"
        )

    def prepare(self, image: FloatImage, info: SourceInfo) -> Prepared:
        """Segment, select the references and scale everything for the engine."""
        selection = self.select(image, info)
        mask, refs = selection.mask, selection.refs
        content = robust_unit(image, mask)
        styles = [robust_unit(r.image, r.mask) for r in refs]
        init = None
        if self.engine.config.init == "ehm":
            pooled = np.concatenate([s[r.mask] for s, r in zip(styles, refs, strict=True)])
            init = exact_histogram_match(content, mask, pooled, background=0.0)
        return Prepared(mask, refs, content, styles, init)

    def finish(self, unit: FloatImage, prepared: Prepared, result: EngineResult) -> MethodResult:
        """The engine's [0, 1] output mapped to the target domain (tone), with provenance."""
        mask, refs = prepared.mask, prepared.refs
        stats = self.bank.stats()
        out = stats.low + unit * np.float32(stats.high - stats.low)
        out[~mask] = np.float32(stats.background)
        cfg = self.engine.config
        if cfg.tone == "ehm":  # the references' exact breast histogram, ranks from the transfer
            out = self.match_tone(out, Selection(mask, 0.0, refs))
        notes = (
            f"patch {cfg.patch_size}",
            f"iterations {cfg.iterations}",
            f"alpha {cfg.alpha:g}",
            f"lr {cfg.lr:g}",
            f"pooling {cfg.pooling}",
            f"init {cfg.init}",
            f"merge {cfg.merge}",
            f"tone {cfg.tone}",
            *_lever_notes(cfg),
            f"refiner {self.refiner_name or 'untrained (average of scales)'}",
            f"tiles {result.tiles_optimized} optimized/{result.tiles_skipped} background",
        )
        provenance = Provenance(
            method=self.name,
            engine_version=self.version,
            references=tuple(r.entry.sop_instance_uid for r in refs),
            scales=cfg.grids,
            features=self.engine.weights_id,
            notes=notes,
        )
        return MethodResult(
            image=np.clip(out, 0.0, 1.0).astype(np.float32),
            provenance=provenance,
            target_range=stats.stored_range,
        )

    def __call__(self, image: FloatImage, info: SourceInfo) -> MethodResult:
        """Normalize one image (unit floats in and out)."""
        prepared = self.prepare(image, info)
        result = self.engine.transfer(
            prepared.content,
            prepared.mask,
            prepared.styles,
            background=0.0,
            init=prepared.init,
            progress=self.progress,
        )
        if self.keep_last:
            self.last = (prepared, result)
        return self.finish(result.image, prepared, result)
