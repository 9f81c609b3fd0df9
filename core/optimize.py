"""Gatys-style optimization of a batch of same-shaped tiles (METHOD.md, "Losses").

:func:`optimize` optimizes the ``(B, 1, h, w)`` tiles of one scale together (the tiles
never interact: each has its own loss buffers, and the loss is a sum of per-tile losses).
It chooses each tile's start, runs Adam (or per-tile L-BFGS), optionally stops early at a
loss goal (:class:`~mr2nst.core.early_stop.LossGoal`), and reports :class:`Progress`
through a callback. The float32 targets come from :mod:`.targets`, built once per batch.
Why it works this way (targets once, mixed precision, the early stop, determinism):
``docs/engine.md``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .early_stop import LossGoal
from .engine_config import EngineConfig, LrSchedule, Optimizer
from .features import STYLE_LAYERS, VGGFeatures
from .losses import TransferLoss
from .targets import content_features

#: ``lr_schedule = "step"``: (fraction of the iterations, lr factor from there on).
LR_STEPS: tuple[tuple[float, float], ...] = ((0.5, 0.3), (0.75, 0.09))
#: L-BFGS curvature pairs kept per tile.
LBFGS_HISTORY = 10


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
    """Which batch of which scale is being optimized (only used to fill :class:`Progress`)."""

    scale: int = 0
    grid: int = 1
    batch: int = 0
    n_batches: int = 1
    tiles_done: int = 0
    tiles_total: int = 0


@dataclass(frozen=True)
class OptimizeSettings:
    """The optimizer's knobs, taken from an :class:`~mr2nst.core.engine_config.EngineConfig`.

    Build it with :meth:`from_config`: the config holds every default (house rule 3).
    ``history`` (L-BFGS curvature pairs kept per tile) is not a config setting.
    """

    iterations: int
    lr: float
    alpha: float
    amp: bool
    report_every: int
    optimizer: Optimizer
    content_layers: tuple[str, ...]
    style_weights: tuple[float, ...]
    pixel_weight: float
    histogram_weight: float
    lr_schedule: LrSchedule
    history: int = LBFGS_HISTORY

    @classmethod
    def from_config(cls, config: EngineConfig) -> OptimizeSettings:
        """The optimizer's settings of the engine's ``config``."""
        return cls(
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
    """Optimized tiles ``(B, 1, h, w)`` in [0, 1], each tile's final loss ``(B,)`` and the
    iterations each tile ran ``(B,)`` (fewer than asked when ``stop_at`` ended the batch)."""

    images: Tensor
    losses: Tensor
    iterations: Tensor
    start: Tensor | None = None  # the start each tile was optimized from (B, 1, h, w)
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


def optimize(
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
    """Optimize the ``(B, 1, h, w)`` ``content`` tiles towards their style ``targets``.

    Args:
        features: the feature network (or a view of it, such as the detail mode's
            :class:`~mr2nst.core.merge.HighPassView`).
        content: the content tiles, ``(B, 1, h, w)`` in [0, 1].
        targets: per-tile target Grams ``{layer: (B, C, C)}`` (:func:`.targets.style_targets`).
        settings: the optimizer's knobs.
        init: the start, shaped like ``content``; None starts from the content.
        progress: receives a :class:`Progress` every ``report_every`` iterations (the mean
            per-tile loss of the iterate that step started from) and once at the end (the
            mean float32 loss of the final, clamped result).
        context: which batch of which scale this is (only used to fill :class:`Progress`).
        stop_at: an early stop (Adam only): the batch ends at the first iterate whose
            summed loss is at or below it (:class:`~mr2nst.core.early_stop.LossGoal`).
        alternative: a second start, shaped like ``content``: each tile begins from
            whichever of the two has the lower loss (``init`` on ties).
        hist_targets: the histogram loss's sorted activations (:func:`.targets.histogram_targets`),
            needed when ``settings.histogram_weight`` > 0.

    Returns:
        The tiles clamped to [0, 1], each tile's float32 final loss and the iterations run.

    Raises:
        ValueError: tiles that are not ``(B, 1, h, w)``, an ``init`` or ``alternative`` of
            another shape, or a histogram weight without ``hist_targets``.
    """
    _check_batch(content, init, alternative, settings, hist_targets)
    n = content.shape[0]
    dtype = None if settings.optimizer == "lbfgs" else amp_dtype(content.device, settings.amp)
    start, chosen = _start(
        features, content, targets, settings, init, alternative, hist_targets, dtype
    )
    loss_fn = transfer_loss(features, content, targets, settings, start, hist_targets)
    report = _Reporter(progress, context or BatchContext(tiles_total=n), settings.iterations)
    if settings.optimizer == "lbfgs":
        result = _lbfgs_tiles(features, content, targets, settings, start, hist_targets)
        ran = settings.iterations
    else:
        goal = None
        if stop_at is not None:
            exact = functools.partial(_exact_loss, features, loss_fn)
            goal = LossGoal(stop_at, exact, dtype is not None, settings.report_every)
        result, ran = _adam(features, loss_fn, start, settings, dtype, goal, report)
    final = _exact_loss(features, loss_fn, result)
    report(settings.iterations, float(final.mean()), n)
    iterations = torch.full((n,), ran, dtype=torch.int64)
    return BatchResult(
        images=result, losses=final, iterations=iterations, start=start, from_alternative=chosen
    )


def _check_batch(
    content: Tensor,
    init: Tensor | None,
    alternative: Tensor | None,
    settings: OptimizeSettings,
    hist_targets: dict[str, Tensor] | None,
) -> None:
    """Raise ValueError unless :func:`optimize`'s inputs fit together."""
    if content.ndim != 4 or content.shape[1] != 1:
        raise ValueError(f"expected (B, 1, h, w) content tiles, got {tuple(content.shape)}")
    if init is not None and init.shape != content.shape:
        raise ValueError(f"init {tuple(init.shape)} != content {tuple(content.shape)}")
    if settings.histogram_weight > 0 and not hist_targets:
        raise ValueError("histogram_weight > 0 needs hist_targets")
    if alternative is not None and alternative.shape != content.shape:
        raise ValueError(
            f"alternative {tuple(alternative.shape)} != content {tuple(content.shape)}"
        )


@dataclass(frozen=True)
class _Reporter:
    """Sends :class:`Progress` of one batch to the caller's callback, if there is one."""

    progress: ProgressCallback | None
    context: BatchContext
    iterations: int

    def __call__(self, iteration: int, loss: float, done: int) -> None:
        """Report ``loss`` at ``iteration``, with ``done`` of this batch's tiles finished."""
        if self.progress is None:
            return
        ctx = self.context
        self.progress(
            Progress(
                scale=ctx.scale,
                grid=ctx.grid,
                batch=ctx.batch,
                n_batches=ctx.n_batches,
                iteration=iteration,
                iterations=self.iterations,
                loss=loss,
                tiles_done=ctx.tiles_done + done,
                tiles_total=ctx.tiles_total,
            )
        )


def _exact_loss(features: VGGFeatures, loss_fn: TransferLoss, image: Tensor) -> Tensor:
    """The float32 loss per tile (no autocast): what the result is judged by."""
    with torch.inference_mode():
        losses: Tensor = loss_fn(features(image, loss_fn.layers), image).float().clone()
    return losses


def _start(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    settings: OptimizeSettings,
    init: Tensor | None,
    alternative: Tensor | None,
    hist_targets: dict[str, Tensor] | None,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor | None]:
    """Each tile's start and, with an ``alternative``, which tiles took it.

    The start is ``init`` (None: the content) clamped to [0, 1]; with an ``alternative``,
    whichever of the two has the lower loss (:func:`_choose_start`)."""
    start = (content if init is None else init).detach().clamp(0.0, 1.0)
    if alternative is None:
        return start, None
    return _choose_start(
        features, content, targets, settings, start, alternative, hist_targets, dtype
    )


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


class _PixelAdam:
    """Adam on the pixels of ``x`` under ``settings``' lr schedule, with a gradient scaler
    for fp16 autocast, clamping ``x`` to [0, 1] after every step."""

    def __init__(self, x: Tensor, settings: OptimizeSettings, dtype: torch.dtype | None) -> None:
        self.x = x
        self._settings = settings
        self._dtype = dtype
        self._adam = torch.optim.Adam([x], lr=settings.lr)
        self._scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def loss(self, features: VGGFeatures, loss_fn: TransferLoss, iteration: int) -> Tensor:
        """The per-tile loss ``(B,)`` of the current iterate (the VGG pass under autocast),
        with the learning rate of ``iteration`` set and the old gradient dropped."""
        for group in self._adam.param_groups:
            group["lr"] = self._settings.lr_at(iteration)
        self.x.grad = None
        with _autocast(self.x.device, self._dtype):
            feats = features(self.x, loss_fn.layers)
        per_tile: Tensor = loss_fn(feats, self.x)
        return per_tile

    def step(self, total: Tensor) -> None:
        """Backpropagate the summed loss, take the step and clamp to [0, 1]."""
        if self._scaler is not None:
            self._scaler.scale(total).backward()  # type: ignore[no-untyped-call, unused-ignore]
            self._scaler.step(self._adam)
            self._scaler.update()
        else:
            total.backward()  # type: ignore[no-untyped-call, unused-ignore]
            self._adam.step()
        with torch.no_grad():
            self.x.clamp_(0.0, 1.0)


def _adam(
    features: VGGFeatures,
    loss_fn: TransferLoss,
    start: Tensor,
    settings: OptimizeSettings,
    dtype: torch.dtype | None,
    goal: LossGoal | None,
    report: _Reporter,
) -> tuple[Tensor, int]:
    """Adam on the pixels from ``start``; returns the result and the iterations run (fewer
    than asked when ``goal`` was reached)."""
    x = start.clone().requires_grad_(True)
    adam = _PixelAdam(x, settings, dtype)
    every = max(1, settings.report_every)
    ran = settings.iterations
    for it in range(settings.iterations):
        per_tile = adam.loss(features, loss_fn, it)
        total = per_tile.sum()
        if goal is not None and goal.reached(it, total, x):
            ran = it
            break
        adam.step(total)
        if (it + 1) % every == 0 and it + 1 < settings.iterations:
            report(it + 1, float(per_tile.detach().mean()), 0)
    x.grad = None
    return x.detach(), ran


def _lbfgs_tiles(
    features: VGGFeatures,
    content: Tensor,
    targets: dict[str, Tensor],
    settings: OptimizeSettings,
    start: Tensor,
    hist_targets: dict[str, Tensor] | None,
) -> Tensor:
    """L-BFGS of each tile on its own (so tiles stay independent), each with its own loss;
    returns the tiles clamped to [0, 1]."""
    tiles = []
    for b in range(content.shape[0]):
        one = transfer_loss(
            features,
            content[b : b + 1],
            {k: v[b : b + 1] for k, v in targets.items()},
            settings,
            start[b : b + 1],
            {k: v[b : b + 1] for k, v in (hist_targets or {}).items()},
        )
        tiles.append(_lbfgs(features, one, start[b : b + 1], settings.iterations, settings.history))
    return torch.cat(tiles)


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
