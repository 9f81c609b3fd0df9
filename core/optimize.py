"""Gatys-style optimisation of a batch of tiles (METHOD.md, "Losses" and "Multi-resolution").

One call optimises a batch of same-shaped tiles of one scale together. Each tile has its
own buffered content features and style targets, and the loss is a sum of per-tile
losses, so the tiles do not interact (Adam is element-wise): batching is only for speed.

- **Targets once.** Reference Grams, their multi-reference target and the content
  features are computed once per batch under ``torch.inference_mode()`` and cloned out
  of it before they become loss buffers.
- **Parametrisation.** Pixels are optimised directly, starting from the content image
  (Normative) or a caller-provided ``init`` (the EHM start), and clamped to [0, 1] after
  every Adam step. ``lr`` is therefore in grey levels of the [0, 1] image.
- **Precision.** On CUDA with ``amp``, the VGG forward runs under autocast in bf16 (fp16
  with a gradient scaler where bf16 is unsupported) and channels-last; Grams and losses
  are computed outside autocast in float32. On CPU everything is float32 and
  deterministic: nothing in the optimisation draws random numbers.
- **Progress.** ``progress`` receives a :class:`Progress` every ``report_every``
  iterations (the mean per-tile loss of the iterate that step started from) and once at
  the end (the mean loss of the final, clamped result).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .features import CONTENT_LAYER, STYLE_LAYERS, VGGFeatures
from .losses import TransferLoss, gram
from .targets import multi_reference_target


@dataclass(frozen=True)
class Progress:
    """Where a transfer stands; ``tiles_done``/``tiles_total`` count the whole transfer."""

    scale: int
    grid: int
    batch: int
    n_batches: int
    iteration: int
    iterations: int
    loss: float
    tiles_done: int
    tiles_total: int


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class BatchContext:
    """Which batch of which scale is being optimised (only used to fill :class:`Progress`)."""

    scale: int = 0
    grid: int = 1
    batch: int = 0
    n_batches: int = 1
    tiles_done: int = 0
    tiles_total: int = 0


@dataclass(frozen=True)
class OptimizeSettings:
    """The optimiser's knobs (see :class:`mr2nst.core.engine.EngineConfig`)."""

    iterations: int = 400
    lr: float = 0.005
    alpha: float = 1e3
    amp: bool = True
    report_every: int = 10


@dataclass(frozen=True)
class BatchResult:
    """Optimised tiles ``(B, 1, h, w)`` in [0, 1] and each tile's final loss ``(B,)``."""

    images: Tensor
    losses: Tensor


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def style_targets(
    features: VGGFeatures,
    references: Sequence[Tensor],
    amp: bool = True,
    layers: Sequence[str] = STYLE_LAYERS,
) -> dict[str, Tensor]:
    """Per-tile multi-reference target Grams ``{layer: (B, C, C)}``.

    ``references[k]`` is ``(B, 1, h, w)``: tile b of reference k for every tile b of the
    batch. One reference at a time goes through the network to bound memory.
    """
    if not references:
        raise ValueError("at least one reference is required")
    device = references[0].device
    dtype = _amp_dtype(device, amp)
    per_layer: dict[str, list[Tensor]] = {name: [] for name in layers}
    with torch.inference_mode():
        for ref in references:
            with _autocast(device, dtype):
                feats = features(ref, layers)
            for name in layers:
                per_layer[name].append(gram(feats[name]))
        targets = {
            name: multi_reference_target(torch.stack(grams, dim=1))
            for name, grams in per_layer.items()
        }
    return {name: t.clone() for name, t in targets.items()}


def content_features(
    features: VGGFeatures, content: Tensor, amp: bool = True, layer: str = CONTENT_LAYER
) -> Tensor:
    """Content-layer features of the content tiles, computed once (float32, autograd-ready)."""
    dtype = _amp_dtype(content.device, amp)
    with torch.inference_mode(), _autocast(content.device, dtype):
        feats: dict[str, Tensor] = features(content, (layer,))
        out = feats[layer].float()
    return out.clone()


def optimise(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    settings: OptimizeSettings,
    init: Tensor | None = None,
    progress: ProgressCallback | None = None,
    context: BatchContext | None = None,
) -> BatchResult:
    """Optimise the ``(B, 1, h, w)`` ``content`` tiles towards their style ``targets``."""
    if content.ndim != 4 or content.shape[1] != 1:
        raise ValueError(f"expected (B, 1, h, w) content tiles, got {tuple(content.shape)}")
    if init is not None and init.shape != content.shape:
        raise ValueError(f"init {tuple(init.shape)} != content {tuple(content.shape)}")
    ctx = context or BatchContext(tiles_total=content.shape[0])
    device = content.device
    dtype = _amp_dtype(device, settings.amp)
    loss_fn = TransferLoss(content_features(features, content, settings.amp), targets, settings.alpha)
    layers = loss_fn.layers
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    start = content if init is None else init
    x = start.detach().clone().clamp_(0.0, 1.0).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=settings.lr)
    every = max(1, settings.report_every)

    def report(iteration: int, loss: float, done: int) -> None:
        if progress is not None:
            progress(
                Progress(
                    scale=ctx.scale, grid=ctx.grid, batch=ctx.batch, n_batches=ctx.n_batches,
                    iteration=iteration, iterations=settings.iterations, loss=loss,
                    tiles_done=ctx.tiles_done + done, tiles_total=ctx.tiles_total,
                )
            )

    for it in range(settings.iterations):
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            feats = features(x, layers)
        per_tile = loss_fn(feats)
        total = per_tile.sum()
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
        else:
            total.backward()
            opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        if (it + 1) % every == 0 and it + 1 < settings.iterations:
            report(it + 1, float(per_tile.detach().mean()), 0)

    result = x.detach()
    with torch.inference_mode():
        with _autocast(device, dtype):
            feats = features(result, layers)
        final = loss_fn(feats).float().clone()
    report(settings.iterations, float(final.mean()), content.shape[0])
    return BatchResult(images=result, losses=final)
