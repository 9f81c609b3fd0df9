"""The public entry of the transfer engine: :class:`Mr2nstEngine` (METHOD.md, mr2NST).

``Mr2nstEngine(config).transfer(content, mask, references)`` runs the multi-resolution,
multi-reference transfer on one float image: per scale, the breast tiles are cut into
batches and optimized against per-tile multi-reference targets (:mod:`.optimize`),
stitched back at native size (:mod:`.tiling`), and the scales are merged by the refiner
(:mod:`.merge`, :mod:`.refiner`). The engine never reads DICOM or chooses references: the
caller passes float images in [0, 1] (references already mirrored to the content's
laterality) and, for ``init = "ehm"``, the EHM-matched start image. Data flow, batching,
the memory budget, mixed precision and the levers: ``docs/engine.md``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from .early_stop import ScaleStop, StopAt
from .engine_config import NOT_FINGERPRINTED, REFINER_KEYS, EngineConfig
from .errors import EngineConfigError, ImageError
from .features import build_features
from .intensity import FloatImage, check_unit_image
from .merge import HighPassView, band_sigmas, merge_inputs, with_detail_of
from .optimize import (
    BatchContext,
    BatchResult,
    OptimizeSettings,
    Progress,
    amp_dtype,
    optimize,
)
from .refiner import Refiner, load_refiner
from .targets import histogram_targets, style_targets
from .tiling import (
    Tile,
    crop_tiles,
    patch_shape,
    resize_patch,
    stitch,
    tile_is_background,
    tiles_for,
)

__all__ = ["EngineConfig", "EngineResult", "Mr2nstEngine", "Progress", "resolved_device"]

#: Bumped whenever the algorithm changes what a given config produces.
ENGINE_REVISION = 2  # 2: the issue-10 levers (L-BFGS line search, detail, bands, residual, ...)
#: Estimated bytes per patch pixel that one tile's optimization keeps on the device, by
#: element size: VGG19's activations up to relu5_1 are about 290 values per input pixel
#: (64·2 + 128·2/4 + 256·4/16 + 512·4/64 + 512/256), kept once for backward plus as much
#: again in transients and pooling indices.
ACTIVATION_BYTES_PER_PIXEL = {4: 2400, 2: 1300}


def resolved_device(config: EngineConfig) -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


@dataclass(frozen=True)
class EngineResult:
    """The output image and how it was made.

    ``scales`` are the stitched scale images before the refiner (no background applied);
    ``merge_inputs`` what the refiner mixed (the scales, or their bands: :mod:`.merge`);
    ``final_losses[k]`` holds the final loss of each optimized tile of scale k (row-major),
    ``iterations_run[k]`` the iterations each ran (fewer than configured after a ``stop_at``).
    """

    image: FloatImage
    scales: tuple[FloatImage, ...]
    tiles_optimized: int
    tiles_skipped: int
    final_losses: tuple[tuple[float, ...], ...]
    seconds: float
    iterations_run: tuple[tuple[int, ...], ...] = ()
    merge_inputs: tuple[FloatImage, ...] = ()


def batch_limit(size: tuple[int, int], config: EngineConfig, device: torch.device) -> int:
    """How many tiles of patch ``size`` one batch may hold (``max_batch`` and the budget)."""
    reduced = config.optimizer == "adam" and amp_dtype(device, config.amp) is not None
    element = 2 if reduced else 4
    per_tile = size[0] * size[1] * ACTIVATION_BYTES_PER_PIXEL[element]
    fits = (config.memory_budget_mb << 20) // per_tile
    return int(max(1, min(config.max_batch, fits)))


def _batches(tiles: Sequence[Tile], config: EngineConfig, device: torch.device) -> list[list[Tile]]:
    """Tiles grouped by patch shape (first-seen order), each group cut into as few,
    evenly sized batches as :func:`batch_limit` allows."""
    groups: dict[tuple[int, int], list[Tile]] = {}
    for tile in tiles:
        groups.setdefault(patch_shape(tile.shape, config.patch_size), []).append(tile)
    out = []
    for size, group in groups.items():
        n_batches = -(-len(group) // batch_limit(size, config, device))
        per = -(-len(group) // n_batches)
        out += [group[start : start + per] for start in range(0, len(group), per)]
    return out


@dataclass(frozen=True)
class _ScalePlan:
    """One scale's tiles (all of them, row-major) and its breast tiles cut into batches."""

    tiles: list[Tile]
    batches: list[list[Tile]]


@dataclass(frozen=True)
class _Images:
    """The transfer's images as (H, W) tensors on the engine's device."""

    content: Tensor
    references: list[Tensor]
    init: Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        """The content's (H, W)."""
        return int(self.content.shape[0]), int(self.content.shape[1])

    @property
    def first(self) -> Tensor:
        """The image the optimization starts from without a warm start: init, or the content."""
        return self.init if self.init is not None else self.content


@dataclass(frozen=True)
class _ScaleResult:
    """One stitched scale and, per optimized tile (row-major), its final loss and the
    iterations it ran."""

    image: Tensor
    losses: tuple[float, ...]
    iterations: tuple[int, ...]


def _native_tiles(
    batch: Sequence[Tile], result: BatchResult, resample: str, native: Tensor, fallback: Tensor
) -> list[Tensor]:
    """The optimized tiles back at native size.

    ``resample = "image"`` resizes each optimized patch. ``"residual"`` adds the resized
    change to the native start, so it keeps its detail: ``native`` (the tile's start), or
    ``fallback`` for tiles whose start was the optimizer's ``alternative``."""
    if resample == "image":
        return [resize_patch(result.images[n : n + 1], t.shape)[0, 0] for n, t in enumerate(batch)]
    assert result.start is not None
    change = result.images - result.start
    outputs = []
    for n, t in enumerate(batch):
        base = native
        if result.from_alternative is not None and bool(result.from_alternative[n]):
            base = fallback
        delta = resize_patch(change[n : n + 1], t.shape)[0, 0]
        outputs.append((base[t.slices] + delta).clamp(0.0, 1.0))
    return outputs


class Mr2nstEngine:
    """Loads the feature network once and transfers any number of images with it.

    Args:
        config: the engine's settings.
        refiner: a trained :class:`~mr2nst.core.refiner.Refiner`, or the path of its
            checkpoint; None merges with the untrained refiner (the plain average, or the
            plain sum of the bands).

    Raises:
        WeightsError: the feature weights are missing or corrupt (never a fallback).
        RefinerError: the checkpoint cannot be read or was trained for another setup.
        EngineConfigError: the refiner merges another number of scales than ``grids``.
    """

    def __init__(self, config: EngineConfig, refiner: Refiner | str | Path | None = None) -> None:
        self._config = config
        self._device = resolved_device(config)
        self._features = build_features(
            config.features, config.pooling, config.weights, config.seed
        ).to(self._device)
        if self._device.type == "cuda":
            self._features = self._features.to(memory_format=torch.channels_last)
        if isinstance(refiner, str | Path):
            refiner = load_refiner(refiner, self.refiner_expectation())
        self._refiner = refiner if refiner is not None else Refiner(len(config.grids))
        self._trained = refiner is not None
        if self._refiner.n_scales != len(config.grids):
            raise EngineConfigError(
                f"engine.refiner: merges {self._refiner.n_scales} scales, "
                f"engine.grids has {len(config.grids)}"
            )
        self._refiner = self._refiner.to(self._device).eval()

    @property
    def config(self) -> EngineConfig:
        """The engine's settings."""
        return self._config

    @property
    def weights_id(self) -> str:
        """``imagenet:<sha256 prefix>`` or ``seeded-random:seed=N``."""
        return self._features.weights_id

    @property
    def refiner_trained(self) -> bool:
        """False when the scales are merged by the untrained refiner (a plain average)."""
        return self._trained

    def refiner_expectation(self) -> dict[str, Any]:
        """What a refiner checkpoint must have been trained for (see :mod:`.refiner`)."""
        cfg = asdict(self._config)
        engine_config = {k: cfg[k] for k in REFINER_KEYS}
        engine_config["grids"] = list(self._config.grids)
        return {"engine_config": engine_config, "weights_id": self.weights_id}

    def fingerprint(self) -> str:
        """Stable id of everything that shapes the output: settings, weights and refiner."""
        cfg = {f.name: getattr(self._config, f.name) for f in fields(self._config)}
        for key in NOT_FINGERPRINTED:
            cfg.pop(key)
        cfg["grids"] = list(self._config.grids)
        blob = json.dumps(
            {
                "revision": ENGINE_REVISION,
                "config": cfg,
                "weights_id": self.weights_id,
                "refiner": self._refiner.id(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _tensor(self, image: npt.NDArray[Any]) -> Tensor:
        array = np.ascontiguousarray(image, dtype=np.float32)
        return torch.from_numpy(array).to(self._device)

    def _validate(
        self,
        content: FloatImage,
        mask: npt.NDArray[np.bool_],
        references: Sequence[FloatImage],
        background: float,
        init: FloatImage | None,
    ) -> None:
        check_unit_image("content", content)
        if mask.shape != content.shape or mask.dtype != np.bool_:
            raise ImageError(f"content_mask must be a bool array of shape {content.shape}")
        if not references:
            raise ImageError("at least one reference image is required")
        for k, ref in enumerate(references):
            check_unit_image(f"references[{k}]", ref)
        if not 0.0 <= background <= 1.0:
            raise ImageError(f"background must be in [0, 1], got {background}")
        if init is None and self._config.init == "ehm":
            raise ImageError('engine.init = "ehm" needs the EHM-matched start image as init')
        if init is not None and self._config.init == "content":
            raise ImageError('an init image was given but engine.init = "content"')
        if init is not None:
            check_unit_image("init", init, (int(content.shape[0]), int(content.shape[1])))

    def _plan(self, shape: tuple[int, int], mask: npt.NDArray[np.bool_]) -> list[_ScalePlan]:
        """Tiles of every scale, with the non-background ones cut into batches."""
        cfg = self._config
        plans = []
        for k, g in enumerate(cfg.grids):
            try:
                tiles = tiles_for(shape, g, cfg.overlap, scale=k)
            except ValueError as exc:
                raise ImageError(f"image {shape} at grid {g}: {exc}") from exc
            active = [
                t for t in tiles if not tile_is_background(mask[t.slices], cfg.background_fraction)
            ]
            plans.append(_ScalePlan(tiles, _batches(active, cfg, self._device)))
        return plans

    def _network(self) -> Any:
        """What the optimization sees: the features, or their high-pass view in detail mode."""
        if self._config.detail_sigma > 0:
            return HighPassView(self._features, self._config.detail_sigma)
        return self._features

    def _run_batch(
        self,
        batch: Sequence[Tile],
        images: _Images,
        progress: Callable[[Progress], None] | None,
        context: BatchContext,
        start: Tensor | None,
        goal: float | None,
    ) -> tuple[list[Tensor], list[float], list[int]]:
        """Optimize one batch of same-shaped tiles from ``start`` (None: the content),
        stopping early once its summed loss is at or below ``goal``.

        Returns the native-size tiles, their final losses and iterations run."""
        cfg = self._config
        size = patch_shape(batch[0].shape, cfg.patch_size)
        network = self._network()
        references = [crop_tiles(r, batch, size, same_grid=False) for r in images.references]
        targets = style_targets(network, references)
        hist = histogram_targets(network, references) if cfg.histogram_weight > 0 else None
        warm = cfg.warm_start and context.scale > 0 and start is not None
        result = optimize(
            network,
            crop_tiles(images.content, batch, size),
            targets,
            OptimizeSettings.from_config(cfg),
            init=None if start is None else crop_tiles(start, batch, size),
            progress=progress,
            context=context,
            stop_at=goal,
            alternative=crop_tiles(images.first, batch, size) if warm else None,
            hist_targets=hist,
        )
        native = start if start is not None else images.content
        outputs = _native_tiles(batch, result, cfg.resample, native, images.first)
        return outputs, [float(v) for v in result.losses], [int(v) for v in result.iterations]

    def _run_scale(
        self,
        scale: int,
        plan: _ScalePlan,
        images: _Images,
        start: Tensor | None,
        progress: Callable[[Progress], None] | None,
        tiles: tuple[int, int],
        stop: ScaleStop | None,
    ) -> _ScaleResult:
        """Optimize one scale's batches from ``start`` (None: the content) and stitch it;
        skipped tiles keep the content. ``tiles`` counts (optimized so far, to optimize in
        the whole transfer) for :class:`Progress`."""
        done, total = tiles
        outputs: dict[Tile, Tensor] = {}
        losses: dict[Tile, float] = {}
        ran: dict[Tile, int] = {}
        for b, batch in enumerate(plan.batches):
            context = BatchContext(scale, plan.tiles[0].grid, b, len(plan.batches), done, total)
            goal = None if stop is None else stop.goal(batch)
            tiles_out, tiles_loss, tiles_ran = self._run_batch(
                batch, images, progress, context, start, goal
            )
            if stop is not None:
                stop.spent(tiles_loss)
            outputs.update(zip(batch, tiles_out, strict=True))
            losses.update(zip(batch, tiles_loss, strict=True))
            ran.update(zip(batch, tiles_ran, strict=True))
            done += len(batch)
        originals = [outputs.get(t, images.content[t.slices]) for t in plan.tiles]
        return _ScaleResult(
            image=stitch(plan.tiles, originals, images.shape),
            losses=tuple(losses[t] for t in plan.tiles if t in losses),
            iterations=tuple(ran[t] for t in plan.tiles if t in ran),
        )

    def merge(
        self,
        inputs: Tensor | Sequence[FloatImage],
        start: Tensor | FloatImage,
        mask: npt.NDArray[np.bool_],
        background: float = 0.0,
        refiner: Refiner | None = None,
    ) -> FloatImage:
        """The output image from what the refiner mixes.

        The refiner, then detail mode toward ``start``, clipping to [0, 1] and
        ``background`` outside ``mask``: the end of :meth:`transfer`, also used to merge
        with another (for example a trained) refiner afterwards.

        Args:
            inputs: ``EngineResult.merge_inputs`` (or the tensor ``(n, H, W)``).
            start: the content, or the EHM start with ``init = "ehm"``.
            mask: the breast, a bool (H, W) array.
            background: the value outside ``mask``.
            refiner: merge with this refiner instead of the engine's.

        Returns:
            The float32 (H, W) image.
        """
        stack = (
            inputs if isinstance(inputs, Tensor) else torch.stack([self._tensor(a) for a in inputs])
        )
        first = start if isinstance(start, Tensor) else self._tensor(start)
        merger = self._refiner if refiner is None else refiner.to(self._device).eval()
        with torch.no_grad():
            merged = merger(stack.to(self._device)[None])[0, 0]
            merged = with_detail_of(merged, first.to(self._device), self._config.detail_sigma)
        image = merged.clamp(0.0, 1.0).cpu().numpy().astype(np.float32)
        image[~mask] = np.float32(background)
        return image

    def transfer(
        self,
        content: FloatImage,
        content_mask: npt.NDArray[np.bool_],
        references: Sequence[FloatImage],
        background: float = 0.0,
        init: FloatImage | None = None,
        progress: Callable[[Progress], None] | None = None,
        stop_at: StopAt | None = None,
    ) -> EngineResult:
        """Transfer ``content`` to the style of ``references``.

        Args:
            content: the (H, W) float image in [0, 1].
            content_mask: its breast, a bool (H, W) array. Tiles with less than
                ``background_fraction`` breast are skipped; pixels outside it are set to
                ``background`` in the output.
            references: float images in [0, 1] of any shapes, mirrored to the content's
                laterality.
            background: the output's value outside the mask, in [0, 1].
            init: the EHM-matched start image, required with ``init = "ehm"`` and refused
                otherwise.
            progress: receives a :class:`Progress` as the optimization goes.
            stop_at: bench only (``mr2nst bench``): loss thresholds per tile
                ``(scale, i, j)``. Each scale stops early once the summed loss of its
                optimized tiles is at or below the sum of their thresholds, checked batch
                by batch (earlier batches' final losses plus this batch's, against the
                thresholds of the tiles so far). A tile without a threshold disables the
                stop for its scale.

        Returns:
            The output image and how it was made.

        Raises:
            ImageError: an image, mask, background or init that does not fit; the message
                names it.
        """
        started = time.perf_counter()
        self._validate(content, content_mask, references, background, init)
        images = _Images(
            content=self._tensor(content),
            references=[self._tensor(r) for r in references],
            init=None if init is None else self._tensor(init),
        )
        plans = self._plan(images.shape, content_mask)
        total = sum(len(b) for plan in plans for b in plan.batches)
        scales: list[_ScaleResult] = []
        done = 0
        for k, plan in enumerate(plans):
            start = images.init
            if self._config.warm_start and scales:
                start = scales[-1].image
            stop = ScaleStop.for_scale(plan.batches, stop_at)
            scales.append(self._run_scale(k, plan, images, start, progress, (done, total), stop))
            done += len(scales[-1].losses)
        stitched = [s.image for s in scales]
        image, inputs = self._merged(stitched, plans, images, content_mask, background)
        return EngineResult(
            image=image,
            scales=tuple(s.cpu().numpy() for s in stitched),
            tiles_optimized=total,
            tiles_skipped=sum(len(p.tiles) for p in plans) - total,
            final_losses=tuple(s.losses for s in scales),
            seconds=time.perf_counter() - started,
            iterations_run=tuple(s.iterations for s in scales),
            merge_inputs=tuple(m.cpu().numpy() for m in inputs),
        )

    def _merged(
        self,
        scales: list[Tensor],
        plans: list[_ScalePlan],
        images: _Images,
        mask: npt.NDArray[np.bool_],
        background: float,
    ) -> tuple[FloatImage, Tensor]:
        """The output image and the refiner's inputs (the scales, or their bands)."""
        cfg = self._config
        sides = [max(max(t.shape) for t in plan.tiles) for plan in plans]
        with torch.no_grad():
            inputs = merge_inputs(
                torch.stack(scales), cfg.merge, band_sigmas(sides, cfg.patch_size)
            )
        return self.merge(inputs, images.first, mask, background), inputs
