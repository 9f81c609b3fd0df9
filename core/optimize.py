"""Gatys-style optimisation of a batch of tiles (METHOD.md, "Losses" and "Multi-resolution").

One call optimises a batch of same-shaped tiles of one scale together. Each tile has its
own buffered content features and style targets, and the loss is a sum of per-tile
losses, so the tiles do not interact (Adam is element-wise): batching is only for speed.

- **Targets once.** Reference Grams, their multi-reference target and the content
  features are computed once per batch, in float32 under ``torch.inference_mode()``, and
  cloned out of it before they become loss buffers.
- **Parametrisation.** Pixels are optimised directly, starting from the content image
  (Normative) or a caller-provided ``init`` (the EHM start, or the previous scale with
  the engine's warm start), and clamped to [0, 1] after every step. ``lr`` is Adam's,
  in grey levels of the [0, 1] image.
- **Optimiser.** Adam (METHOD.md) by default, with an optional step schedule of its
  learning rate (``lr_schedule = "step"``: ×0.3 at 50 % and 75 % of the iterations).
  ``optimizer = "lbfgs"`` is L-BFGS as Gatys et al. used it: :class:`torch.optim.LBFGS`
  with a strong-Wolfe line search, one tile at a time (so tiles stay independent), in
  float32, unclamped during the run and clamped to [0, 1] at the end; ``iterations`` are
  L-BFGS iterations (each may evaluate the loss more than once). No graph outlives an
  iteration (``x.grad`` is dropped and the loss is only read through ``detach``).
- **Early stop.** (Adam only.) ``stop_at`` ends the batch at the first iterate whose summed loss is
  at or below it (the bench uses it to time how fast the engine reaches the plain
  loop's loss on each scale).
- **Precision.** With ``amp``, the VGG forward runs under autocast: on CUDA in bf16 (fp16
  with a gradient scaler where bf16 is unsupported) and channels-last, on a CPU with
  native bf16 (AVX512-BF16 or AMX; :func:`cpu_has_bf16`) in bf16, elsewhere in float32.
  Grams and losses are computed outside autocast in float32, and the final loss of each
  tile is always a float32 evaluation. Nothing in the optimisation draws random numbers,
  so a run is deterministic on a given machine.
- **Progress.** ``progress`` receives a :class:`Progress` every ``report_every``
  iterations (the mean per-tile loss of the iterate that step started from) and once at
  the end (the mean float32 loss of the final, clamped result).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .features import CONTENT_LAYER, STYLE_LAYERS, VGGFeatures
from .losses import TransferLoss, gram
from .targets import multi_reference_target, quantile_indices

#: Risser et al.'s histogram layers.
HISTOGRAM_LAYERS: tuple[str, ...] = ("relu1_1", "relu4_1")
#: ``lr_schedule = "step"``: (fraction of the iterations, lr factor from there on).
LR_STEPS: tuple[tuple[float, float], ...] = ((0.5, 0.3), (0.75, 0.09))


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
    optimizer: str = "adam"  # "adam" | "lbfgs"
    history: int = 10  # L-BFGS curvature pairs kept per tile
    content_layers: tuple[str, ...] = (CONTENT_LAYER,)
    style_weights: tuple[float, ...] = (1.0,) * len(STYLE_LAYERS)
    pixel_weight: float = 0.0
    histogram_weight: float = 0.0
    lr_schedule: str = "constant"  # "constant" | "step"

    def lr_at(self, iteration: int) -> float:
        """Adam's learning rate at ``iteration`` (0-based) under the schedule."""
        factor = 1.0
        if self.lr_schedule == "step":
            for fraction, value in LR_STEPS:
                if iteration >= fraction * self.iterations:
                    factor = value
        return self.lr * factor


@dataclass(frozen=True)
class BatchResult:
    """Optimised tiles ``(B, 1, h, w)`` in [0, 1], each tile's final loss ``(B,)`` and the
    iterations each tile ran ``(B,)`` (fewer than asked when ``stop_at`` ended the batch)."""

    images: Tensor
    losses: Tensor
    iterations: Tensor
    start: Tensor | None = None  # the start each tile was optimised from (B, 1, h, w)
    from_alternative: Tensor | None = None  # (B,) bool: that start was ``alternative``


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so that autocast
    to bf16 makes oneDNN's convolutions faster instead of emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype of the VGG forward, or None for float32.

    CUDA: bf16, or fp16 where bf16 is unsupported. CPU: bf16 where the CPU has it
    natively (:func:`cpu_has_bf16`), else float32."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def _autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _per_reference(
    features: VGGFeatures,
    references: Sequence[Tensor],
    layers: Sequence[str],
    reduce: Callable[[Tensor], Tensor],
) -> dict[str, list[Tensor]]:
    """``{layer: [reduce(features of reference k) for each k]}``, one reference at a time
    through the network (bounded memory), under ``inference_mode``."""
    if not references:
        raise ValueError("at least one reference is required")
    per_layer: dict[str, list[Tensor]] = {name: [] for name in layers}
    with torch.inference_mode():
        for ref in references:
            feats = features(ref, layers)
            for name in layers:
                per_layer[name].append(reduce(feats[name]))
    return per_layer


def style_targets(
    features: VGGFeatures,
    references: Sequence[Tensor],
    layers: Sequence[str] = STYLE_LAYERS,
) -> dict[str, Tensor]:
    """Per-tile multi-reference target Grams ``{layer: (B, C, C)}``, in float32.

    ``references[k]`` is ``(B, 1, h, w)``: tile b of reference k for every tile b of the
    batch. One reference at a time goes through the network to bound memory. Targets
    are computed once, so they are never autocast: with ``amp`` only the optimisation's
    passes are reduced-precision, and the loss is the float32 one.
    """
    per_layer = _per_reference(features, references, layers, gram)
    with torch.inference_mode():
        targets = {
            name: multi_reference_target(torch.stack(grams, dim=1))
            for name, grams in per_layer.items()
        }
    return {name: t.clone() for name, t in targets.items()}


def histogram_targets(
    features: VGGFeatures,
    references: Sequence[Tensor],
    layers: Sequence[str] = HISTOGRAM_LAYERS,
) -> dict[str, Tensor]:
    """Per-tile sorted target activations ``{layer: (B, C, M)}`` for the histogram loss.

    Each channel's activations of tile b of every reference are pooled and sorted, and M
    evenly ranked quantiles kept (M = positions of one tile at that layer), in float32."""
    per_layer = _per_reference(features, references, layers, lambda f: f.float().flatten(2))
    with torch.inference_mode():
        out = {}
        for name, flats in per_layer.items():
            m = flats[0].shape[-1]
            pooled = torch.sort(torch.cat(flats, dim=-1), dim=-1).values
            out[name] = pooled.index_select(
                -1, quantile_indices(m, pooled.shape[-1], pooled.device)
            )
    return {name: t.clone() for name, t in out.items()}


def content_features(
    features: VGGFeatures, content: Tensor, layers: Sequence[str] = (CONTENT_LAYER,)
) -> dict[str, Tensor]:
    """Content-layer features of the content tiles, computed once in float32 (see
    :func:`style_targets`), autograd-ready."""
    with torch.inference_mode():
        feats: dict[str, Tensor] = features(content, tuple(layers))
        out = {name: feats[name].float() for name in layers}
    return {name: t.clone() for name, t in out.items()}


def transfer_loss(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    settings: OptimizeSettings,
    start: Tensor,
    hist_targets: dict[str, Tensor] | None = None,
) -> TransferLoss:
    """The loss of one batch: content at ``settings.content_layers``, the style targets with
    their weights, and the optional pixel (toward ``start``) and histogram terms."""
    weights = dict(zip(STYLE_LAYERS, settings.style_weights, strict=True))
    return TransferLoss(
        content_features(features, content, settings.content_layers),
        targets,
        settings.alpha,
        style_weights=weights,
        pixel_target=start,
        pixel_weight=settings.pixel_weight,
        histogram_targets=hist_targets,
        histogram_weight=settings.histogram_weight,
    )


def _lbfgs(
    features: VGGFeatures, loss_fn: TransferLoss, start: Tensor, iterations: int, history: int
) -> Tensor:
    """Gatys-style L-BFGS (strong-Wolfe line search) of one ``(1, 1, h, w)`` tile, float32;
    returns the result clamped to [0, 1]."""
    x = start.detach().clone().requires_grad_(True)
    if iterations > 0:
        opt = torch.optim.LBFGS(
            [x],
            lr=1.0,
            max_iter=iterations,
            history_size=history,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            loss: Tensor = loss_fn(features(x, loss_fn.layers), x).sum()
            loss.backward()  # type: ignore[no-untyped-call, unused-ignore]
            return loss.detach()

        opt.step(closure)  # type: ignore[no-untyped-call, unused-ignore]
    out: Tensor = x.detach().clamp(0.0, 1.0)
    return out


def _choose_start(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    settings: OptimizeSettings,
    start: Tensor,
    alternative: Tensor,
    hist_targets: dict[str, Tensor] | None,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    """Per tile, whichever of ``start`` and ``alternative`` has the lower loss (``start`` on
    ties), and which tiles took ``alternative``. The pixel term is 0 at either candidate
    itself, so it is left out here."""
    if alternative.shape != content.shape:
        raise ValueError(
            f"alternative {tuple(alternative.shape)} != content {tuple(content.shape)}"
        )
    other = alternative.detach().clamp(0.0, 1.0)
    loss_fn = transfer_loss(
        features, content, targets, replace(settings, pixel_weight=0.0), start, hist_targets
    )
    with torch.inference_mode():
        losses = []
        for candidate in (start, other):  # the loss buffers hold one row per tile
            with _autocast(content.device, dtype):
                feats = features(candidate, loss_fn.layers)
            losses.append(loss_fn(feats, candidate).float())
    better = losses[1] < losses[0]
    return torch.where(better.view(-1, 1, 1, 1), other, start), better


def optimise(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    settings: OptimizeSettings,
    init: Tensor | None = None,
    progress: ProgressCallback | None = None,
    context: BatchContext | None = None,
    stop_at: float | None = None,
    alternative: Tensor | None = None,
    hist_targets: dict[str, Tensor] | None = None,
) -> BatchResult:
    """Optimise the ``(B, 1, h, w)`` ``content`` tiles towards their style ``targets``.

    ``alternative`` (optional, like ``init``) is a second start: each tile begins from
    whichever of the two has the lower loss (``init`` on ties). ``hist_targets`` are the
    histogram loss's sorted activations (:func:`histogram_targets`), needed when
    ``settings.histogram_weight`` > 0.

    ``stop_at`` (optional, Adam only) is an early stop: the batch ends at the first iterate
    whose summed loss is at or below it (under autocast, confirmed in float32 at most
    every ``report_every`` iterations).
    """
    if content.ndim != 4 or content.shape[1] != 1:
        raise ValueError(f"expected (B, 1, h, w) content tiles, got {tuple(content.shape)}")
    if init is not None and init.shape != content.shape:
        raise ValueError(f"init {tuple(init.shape)} != content {tuple(content.shape)}")
    if settings.histogram_weight > 0 and not hist_targets:
        raise ValueError("histogram_weight > 0 needs hist_targets")
    n = content.shape[0]
    ctx = context or BatchContext(tiles_total=n)
    device = content.device
    dtype = None if settings.optimizer == "lbfgs" else amp_dtype(device, settings.amp)

    start = (content if init is None else init).detach().clamp(0.0, 1.0)
    chosen = None
    if alternative is not None:
        start, chosen = _choose_start(
            features, content, targets, settings, start, alternative, hist_targets, dtype
        )
    loss_fn = transfer_loss(features, content, targets, settings, start, hist_targets)
    layers = loss_fn.layers

    def report(iteration: int, loss: float, done: int) -> None:
        if progress is not None:
            progress(
                Progress(
                    scale=ctx.scale,
                    grid=ctx.grid,
                    batch=ctx.batch,
                    n_batches=ctx.n_batches,
                    iteration=iteration,
                    iterations=settings.iterations,
                    loss=loss,
                    tiles_done=ctx.tiles_done + done,
                    tiles_total=ctx.tiles_total,
                )
            )

    def exact_loss(image: Tensor) -> Tensor:
        """The float32 loss per tile (no autocast): what the result is judged by."""
        with torch.inference_mode():
            losses: Tensor = loss_fn(features(image, layers), image).float().clone()
        return losses

    if settings.optimizer == "lbfgs":
        tiles = []
        for b in range(n):
            one = transfer_loss(
                features,
                content[b : b + 1],
                {k: v[b : b + 1] for k, v in targets.items()},
                settings,
                start[b : b + 1],
                {k: v[b : b + 1] for k, v in (hist_targets or {}).items()},
            )
            tiles.append(
                _lbfgs(features, one, start[b : b + 1], settings.iterations, settings.history)
            )
        result = torch.cat(tiles)
        ran = settings.iterations
    else:
        result, ran = _adam(features, loss_fn, start, settings, dtype, stop_at, exact_loss, report)
    final = exact_loss(result)
    report(settings.iterations, float(final.mean()), n)
    iterations = torch.full((n,), ran, dtype=torch.int64)
    return BatchResult(
        images=result, losses=final, iterations=iterations, start=start, from_alternative=chosen
    )


def _adam(
    features: VGGFeatures,
    loss_fn: TransferLoss,
    start: Tensor,
    settings: OptimizeSettings,
    dtype: torch.dtype | None,
    stop_at: float | None,
    exact_loss: Callable[[Tensor], Tensor],
    report: Callable[[int, float, int], None],
) -> tuple[Tensor, int]:
    """Adam on the pixels (clamped to [0, 1] after each step); returns the result and the
    iterations run (fewer than asked when ``stop_at`` was reached)."""
    device = start.device
    x = start.clone().requires_grad_(True)
    adam = torch.optim.Adam([x], lr=settings.lr)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    layers = loss_fn.layers
    every = max(1, settings.report_every)
    ran = settings.iterations
    checked = -every  # the last iteration whose iterate got a float32 check of stop_at
    for it in range(settings.iterations):
        for group in adam.param_groups:
            group["lr"] = settings.lr_at(it)
        x.grad = None
        with _autocast(device, dtype):
            feats = features(x, layers)
        per_tile = loss_fn(feats, x)
        total = per_tile.sum()
        if stop_at is not None and float(total.detach()) <= stop_at:
            if dtype is None:
                ran = it
                break
            if it - checked >= every:  # a reduced-precision loss: confirm it in float32
                checked = it
                if float(exact_loss(x.detach()).double().sum()) <= stop_at:
                    ran = it
                    break
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(adam)
            scaler.update()
        else:
            total.backward()
            adam.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        if (it + 1) % every == 0 and it + 1 < settings.iterations:
            report(it + 1, float(per_tile.detach().mean()), 0)
    x.grad = None
    return x.detach(), ran
