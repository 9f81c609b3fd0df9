"""The public entry of the transfer engine: :class:`Mr2nstEngine` (METHOD.md, mr2NST).

``Mr2nstEngine(config).transfer(content, mask, references)`` runs the multi-resolution,
multi-reference transfer on one float image:

1. For each scale ``k`` (grid ``g_k``), tile the *native* content image
   (:mod:`~mr2nst.core.tiling`); tiles with less than ``background_fraction`` breast are
   skipped and keep the content.
2. Each remaining tile is resized (aspect kept) to its patch shape; the same tile, in
   relative coordinates, of *every* reference is resized to that shape too, and the
   per-tile multi-reference Gram target is built from them (:mod:`~mr2nst.core.targets`).
3. Tiles of the same patch shape are optimised together (:mod:`~mr2nst.core.optimize`),
   in as few, evenly sized batches as ``max_batch`` and ``memory_budget_mb`` allow,
   resized back and stitched with feathering. With ``warm_start``, scale k > 0 starts
   each tile from the stitched result of scale k-1 (coarse to fine) or, where that
   tile's loss is lower there, from the content (or EHM) image; the content loss still
   compares with the content.
4. The refiner merges the scales (``merge = "average"``) or their frequency bands
   (``"bands"``; :mod:`~mr2nst.core.merge`); untrained, it is the plain average or the
   plain sum of the bands. With ``detail_sigma`` the low band comes from the start image
   (detail mode). The result is clipped to [0, 1] and background pixels (mask False) are
   set to ``background``.

**Speed and memory.** Target Grams and content features are computed once per batch under
``inference_mode``; no graph outlives an iteration; on CUDA the VGG forward runs under
autocast (bf16, fp16 where bf16 is missing) in channels-last, and ``device = "auto"``
picks CUDA when present. The batch size comes from an activation-memory estimate per
patch pixel (:data:`ACTIVATION_BYTES_PER_PIXEL`, for VGG19 up to relu5_1 with the
tensors autograd keeps, doubled for the backward pass's transients). ``transfer``'s
``stop_at`` gives per-tile loss thresholds for an early stop per scale (used by
``mr2nst bench`` to time how fast the engine reaches a given loss); it is not a setting
because it depends on the image.

**Defaults.** Chosen by the evaluation harness; the reasons are in ``docs/evaluation.md``
and beside each default in :mod:`.engine_config`. The warm start and L-BFGS change the
output; ``mr2nst bench`` measures speed (``benchmarks/README.md``).

The engine never reads DICOM or decides anything about references: the caller passes
float images in [0, 1] (references already mirrored to the content's laterality) and,
for ``init = "ehm"``, the EHM-matched start image.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from .engine_config import NOT_FINGERPRINTED, REFINER_KEYS, EngineConfig
from .errors import EngineConfigError, ImageError
from .features import build_features
from .intensity import FloatImage
from .merge import HighPassView, band_sigmas, merge_inputs, with_detail_of
from .optimize import (
    BatchContext,
    OptimizeSettings,
    Progress,
    amp_dtype,
    histogram_targets,
    optimise,
    style_targets,
)
from .refiner import Refiner, load_refiner
from .tiling import Tile, patch_shape, stitch, tile_is_background, tiles_for

__all__ = ["EngineConfig", "EngineResult", "Mr2nstEngine", "Progress", "resolved_device"]

#: Bumped whenever the algorithm changes what a given config produces.
ENGINE_REVISION = 2  # 2: the issue-10 levers (L-BFGS line search, detail, bands, residual, ...)
#: Estimated bytes per patch pixel that one tile's optimisation keeps on the device, by
#: element size: VGG19's activations up to relu5_1 are about 290 values per input pixel
#: (64·2 + 128·2/4 + 256·4/16 + 512·4/64 + 512/256), kept once for backward plus as much
#: again in transients and pooling indices.
ACTIVATION_BYTES_PER_PIXEL = {4: 2400, 2: 1300}
#: Loss thresholds for an early stop, keyed by tile ``(scale, i, j)``.
StopAt = Mapping[tuple[int, int, int], float]


def optimize_settings(config: EngineConfig) -> OptimizeSettings:
    """The optimiser's settings taken from the engine's config."""
    return OptimizeSettings(
        iterations=config.iterations,
        lr=config.lr,
        alpha=config.alpha,
        amp=config.amp,
        report_every=config.report_every,
        optimizer=config.optimizer,
        content_layers=config.content_layers,
        style_weights=config.style_weights,
        pixel_weight=config.pixel_weight,
        histogram_weight=config.histogram_weight,
        lr_schedule=config.lr_schedule,
    )


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
    ``final_losses[k]`` holds the final loss of each optimised tile of scale k (row-major),
    ``iterations_run[k]`` the iterations each ran (fewer than configured after a ``stop_at``).
    """

    image: FloatImage
    scales: tuple[FloatImage, ...]
    tiles_optimised: int
    tiles_skipped: int
    final_losses: tuple[tuple[float, ...], ...]
    seconds: float
    iterations_run: tuple[tuple[int, ...], ...] = ()
    merge_inputs: tuple[FloatImage, ...] = ()


def resize_patch(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of ``(B, 1, h, w)`` to ``size``."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _check_image(name: str, image: npt.NDArray[Any], shape: tuple[int, int] | None = None) -> None:
    if image.ndim != 2 or min(image.shape) < 1:
        raise ImageError(f"{name} must be a 2-D image, got shape {image.shape}")
    if shape is not None and image.shape != shape:
        raise ImageError(f"{name} has shape {image.shape}, the content {shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ImageError(f"{name} must be a float image in [0, 1], got dtype {image.dtype}")
    if not np.all(np.isfinite(image)):
        raise ImageError(f"{name} contains NaN or infinite values")
    if image.min() < 0.0 or image.max() > 1.0:
        raise ImageError(
            f"{name} must lie in [0, 1], got [{float(image.min())}, {float(image.max())}]"
        )


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
    tiles: list[Tile]
    batches: list[list[Tile]]


@dataclass(frozen=True)
class _Images:
    """The transfer's images as (H, W) tensors on the engine's device."""

    content: Tensor
    references: list[Tensor]
    init: Tensor | None


def _scale_goal(plan: _ScalePlan, stop_at: StopAt | None) -> float | None:
    """0.0 (no margin yet) when every optimised tile of the scale has a threshold, else None."""
    if stop_at is None:
        return None
    keys = [(t.scale, t.i, t.j) for batch in plan.batches for t in batch]
    return 0.0 if keys and all(key in stop_at for key in keys) else None


class Mr2nstEngine:
    """Loads the feature network once and transfers any number of images with it."""

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
        _check_image("content", content)
        if mask.shape != content.shape or mask.dtype != np.bool_:
            raise ImageError(f"content_mask must be a bool array of shape {content.shape}")
        if not references:
            raise ImageError("at least one reference image is required")
        for k, ref in enumerate(references):
            _check_image(f"references[{k}]", ref)
        if not 0.0 <= background <= 1.0:
            raise ImageError(f"background must be in [0, 1], got {background}")
        if init is None and self._config.init == "ehm":
            raise ImageError('engine.init = "ehm" needs the EHM-matched start image as init')
        if init is not None and self._config.init == "content":
            raise ImageError('an init image was given but engine.init = "content"')
        if init is not None:
            _check_image("init", init, (int(content.shape[0]), int(content.shape[1])))

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

    def _run_batch(
        self,
        batch: Sequence[Tile],
        images: _Images,
        progress: Callable[[Progress], None] | None,
        context: BatchContext,
        start: Tensor | None,
        goal: float | None,
    ) -> tuple[list[Tensor], list[float], list[int]]:
        """Optimise one batch of same-shaped tiles from ``start`` (None: the content),
        stopping early once its summed loss is at or below ``goal``.

        Returns the native-size tiles, their final losses and iterations run."""
        cfg = self._config
        size = patch_shape(batch[0].shape, cfg.patch_size)

        def crops(image: Tensor, same_grid: bool = True) -> Tensor:
            h, w = image.shape
            boxes = [t.slices if same_grid else t.box_on((h, w)) for t in batch]
            return torch.cat([resize_patch(image[box][None, None], size) for box in boxes])

        network: Any = self._features
        if cfg.detail_sigma > 0:  # detail mode: the NST works on the high-pass layer
            network = HighPassView(self._features, cfg.detail_sigma)
        references = [crops(r, same_grid=False) for r in images.references]
        targets = style_targets(network, references)
        settings = optimize_settings(cfg)
        hist = histogram_targets(network, references) if cfg.histogram_weight > 0 else None
        warm = cfg.warm_start and context.scale > 0 and start is not None
        fallback = images.init if images.init is not None else images.content
        result = optimise(
            network,
            crops(images.content),
            targets,
            settings,
            init=None if start is None else crops(start),
            progress=progress,
            context=context,
            stop_at=goal,
            alternative=crops(fallback) if warm else None,
            hist_targets=hist,
        )
        if cfg.resample == "image":
            outputs = [
                resize_patch(result.images[n : n + 1], t.shape)[0, 0] for n, t in enumerate(batch)
            ]
        else:  # "residual": the native start keeps its detail; only the change is resampled
            assert result.start is not None
            change = result.images - result.start
            native = start if start is not None else images.content
            outputs = []
            for n, t in enumerate(batch):
                base = native
                if result.from_alternative is not None and bool(result.from_alternative[n]):
                    base = fallback
                delta = resize_patch(change[n : n + 1], t.shape)[0, 0]
                outputs.append((base[t.slices] + delta).clamp(0.0, 1.0))
        return outputs, [float(v) for v in result.losses], [int(v) for v in result.iterations]

    def merge(
        self,
        inputs: Tensor | Sequence[FloatImage],
        start: Tensor | FloatImage,
        mask: npt.NDArray[np.bool_],
        background: float = 0.0,
        refiner: Refiner | None = None,
    ) -> FloatImage:
        """The output image from what the refiner mixes (``EngineResult.merge_inputs``):
        the refiner (this engine's, or ``refiner``), detail mode toward ``start`` (the
        content, or the EHM start), clipping to [0, 1] and ``background`` outside ``mask``."""
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
        """Transfer ``content`` (H, W) to the style of ``references`` (see module doc).

        ``stop_at`` (optional) maps tiles ``(scale, i, j)`` to loss thresholds: each scale
        stops early once the summed loss of its optimised tiles is at or below the sum of
        their thresholds. Batch by batch: a batch stops as soon as the scale's loss so
        far (earlier batches' final losses plus this batch's) is at or below the
        thresholds of the tiles so far. A tile without a threshold disables the stop for
        its scale."""
        started = time.perf_counter()
        self._validate(content, content_mask, references, background, init)
        shape = (int(content.shape[0]), int(content.shape[1]))
        images = _Images(
            content=self._tensor(content),
            references=[self._tensor(r) for r in references],
            init=None if init is None else self._tensor(init),
        )
        plans = self._plan(shape, content_mask)
        total = sum(len(b) for plan in plans for b in plan.batches)

        scales: list[Tensor] = []
        losses: list[tuple[float, ...]] = []
        ran: list[tuple[int, ...]] = []
        done = 0
        for k, plan in enumerate(plans):
            outputs: dict[Tile, Tensor] = {}
            scale_losses: dict[Tile, float] = {}
            scale_ran: dict[Tile, int] = {}
            start = images.init
            if self._config.warm_start and scales:
                start = scales[-1]
            slack = _scale_goal(plan, stop_at)  # the goal's margin left to this scale's batches
            for b, batch in enumerate(plan.batches):
                context = BatchContext(k, plan.tiles[0].grid, b, len(plan.batches), done, total)
                goal = None
                if slack is not None and stop_at is not None:
                    goal = slack + math.fsum(stop_at[(t.scale, t.i, t.j)] for t in batch)
                tiles_out, tiles_loss, tiles_ran = self._run_batch(
                    batch, images, progress, context, start, goal
                )
                if goal is not None:
                    slack = goal - math.fsum(tiles_loss)
                outputs.update(zip(batch, tiles_out, strict=True))
                scale_losses.update(zip(batch, tiles_loss, strict=True))
                scale_ran.update(zip(batch, tiles_ran, strict=True))
                done += len(batch)
            originals = [outputs.get(t, images.content[t.slices]) for t in plan.tiles]
            scales.append(stitch(plan.tiles, originals, shape))
            losses.append(tuple(scale_losses[t] for t in plan.tiles if t in scale_losses))
            ran.append(tuple(scale_ran[t] for t in plan.tiles if t in scale_ran))

        cfg = self._config
        sides = [max(max(t.shape) for t in plan.tiles) for plan in plans]
        with torch.no_grad():
            inputs = merge_inputs(
                torch.stack(scales), cfg.merge, band_sigmas(sides, cfg.patch_size)
            )
        start = images.init if images.init is not None else images.content
        image = self.merge(inputs, start, content_mask, background)
        return EngineResult(
            image=image,
            scales=tuple(s.cpu().numpy() for s in scales),
            tiles_optimised=total,
            tiles_skipped=sum(len(p.tiles) for p in plans) - total,
            final_losses=tuple(losses),
            seconds=time.perf_counter() - started,
            iterations_run=tuple(ran),
            merge_inputs=tuple(m.cpu().numpy() for m in inputs),
        )
