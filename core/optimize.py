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
- **Optimiser.** Adam (METHOD.md) by default; ``optimizer = "lbfgs"`` is a per-tile
  L-BFGS (:class:`_PerTileLBFGS`) with one forward and backward pass per iteration, so
  iterations cost the same. No graph outlives an iteration (``x.grad`` is dropped and
  the loss is only read through ``detach``).
- **Early stop.** ``stop_at`` ends the batch at the first iterate whose summed loss is
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
    optimizer: str = "adam"  # "adam" | "lbfgs"
    history: int = 10  # L-BFGS curvature pairs kept per tile


@dataclass(frozen=True)
class BatchResult:
    """Optimised tiles ``(B, 1, h, w)`` in [0, 1], each tile's final loss ``(B,)`` and the
    iterations each tile ran ``(B,)`` (fewer than asked when ``stop_at`` ended the batch)."""

    images: Tensor
    losses: Tensor
    iterations: Tensor


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


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
    if not references:
        raise ValueError("at least one reference is required")
    per_layer: dict[str, list[Tensor]] = {name: [] for name in layers}
    with torch.inference_mode():
        for ref in references:
            feats = features(ref, layers)
            for name in layers:
                per_layer[name].append(gram(feats[name]))
        targets = {
            name: multi_reference_target(torch.stack(grams, dim=1))
            for name, grams in per_layer.items()
        }
    return {name: t.clone() for name, t in targets.items()}


def content_features(features: VGGFeatures, content: Tensor, layer: str = CONTENT_LAYER) -> Tensor:
    """Content-layer features of the content tiles, computed once in float32 (see
    :func:`style_targets`), autograd-ready."""
    with torch.inference_mode():
        feats: dict[str, Tensor] = features(content, (layer,))
        out = feats[layer].float()
    return out.clone()


class _PerTileLBFGS:
    """L-BFGS with one curvature history per tile, so batched tiles stay independent.

    The two-loop recursion uses per-tile dot products; the step is the quasi-Newton step
    itself (unit length, scaled by ``γ = sᵀy / yᵀy`` of the newest pair), the first one a
    gradient step of ``min(1, 1/‖g‖₁)`` as in :class:`torch.optim.LBFGS`. Pairs with
    ``sᵀy ≤ 0`` (possible after clamping) are ignored for that tile, and a tile whose loss
    rose rejects that step (goes back to the previous iterate), drops its history and
    restarts from a small gradient step: a cheap safeguard in place of a line search, so
    every iteration costs one forward and backward pass.
    ``s`` is the step actually taken, after clamping to [0, 1].
    """

    def __init__(self, x: Tensor, history: int = 10) -> None:
        self.x = x
        self.history = history
        self.pairs: list[tuple[Tensor, Tensor, Tensor]] = []  # s, y, rho (rho 0 = unused)
        self.gamma: Tensor | None = None
        self.prev_x: Tensor | None = None
        self.prev_g: Tensor | None = None
        self.prev_loss: Tensor | None = None

    def step(self, loss: Tensor) -> None:
        """One update from ``x.grad`` and the per-tile ``loss`` of the current iterate."""
        assert self.x.grad is not None
        g = self.x.grad.detach().flatten(1).float()
        xf = self.x.detach().flatten(1).float().clone()
        loss = loss.detach().float()
        b = g.shape[0]
        restart = torch.zeros(b, dtype=torch.bool, device=g.device)
        if self.prev_x is not None and self.prev_g is not None and self.prev_loss is not None:
            s, y = xf - self.prev_x, g - self.prev_g
            ys = (s * y).sum(1)
            ok = ys > 1e-12 * s.square().sum(1).sqrt() * y.square().sum(1).sqrt()
            restart = loss > self.prev_loss
            ok &= ~restart
            rho = torch.where(ok, 1.0 / torch.where(ok, ys, torch.ones_like(ys)), 0.0)
            self.pairs.append((s, y, rho))
            del self.pairs[: max(0, len(self.pairs) - self.history)]
            gamma = ys / y.square().sum(1).clamp_min(1e-30)
            assert self.gamma is not None
            self.gamma = torch.where(ok, gamma, self.gamma)
            for _, _, r in self.pairs:  # unconditionally: no host sync on CUDA
                r.masked_fill_(restart, 0.0)
            # A rejected step: go back to the previous iterate, which had the lower loss.
            back = restart[:, None]
            xf = torch.where(back, self.prev_x, xf)
            g = torch.where(back, self.prev_g, g)
            loss = torch.where(restart, self.prev_loss, loss)
            with torch.no_grad():
                self.x.copy_(xf.view_as(self.x).to(self.x.dtype))
        first = 1.0 / g.abs().sum(1).clamp_min(1e-30)
        if self.gamma is None:
            self.gamma = first.clamp(max=1.0)
        self.gamma = torch.where(restart, 0.1 * first.clamp(max=1.0), self.gamma)
        q = g.clone()
        alphas = []
        for s, y, rho in reversed(self.pairs):
            a = rho * (s * q).sum(1)
            q -= a[:, None] * y
            alphas.append(a)
        r = self.gamma[:, None] * q
        for (s, y, rho), a in zip(self.pairs, reversed(alphas), strict=True):
            beta = rho * (y * r).sum(1)
            r += s * (a - beta)[:, None]
        uphill = (g * r).sum(1) <= 0
        r = torch.where(uphill[:, None], first.clamp(max=1.0)[:, None] * g, r)
        self.prev_x, self.prev_g, self.prev_loss = xf, g, loss
        with torch.no_grad():
            self.x.sub_(r.view_as(self.x).to(self.x.dtype))


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
) -> BatchResult:
    """Optimise the ``(B, 1, h, w)`` ``content`` tiles towards their style ``targets``.

    ``alternative`` (optional, like ``init``) is a second start: each tile begins from
    whichever of the two has the lower loss (``init`` on ties).

    ``stop_at`` (optional) is an early stop: the batch ends at the first iterate whose
    summed loss is at or below it (under autocast, confirmed in float32 at most every
    ``report_every`` iterations).
    """
    if content.ndim != 4 or content.shape[1] != 1:
        raise ValueError(f"expected (B, 1, h, w) content tiles, got {tuple(content.shape)}")
    if init is not None and init.shape != content.shape:
        raise ValueError(f"init {tuple(init.shape)} != content {tuple(content.shape)}")
    n = content.shape[0]
    ctx = context or BatchContext(tiles_total=n)
    device = content.device
    dtype = amp_dtype(device, settings.amp)
    if settings.optimizer == "lbfgs":
        dtype = None  # its curvature pairs need float32 gradients (and it has no grad scaler)
    loss_fn = TransferLoss(content_features(features, content), targets, settings.alpha)
    layers = loss_fn.layers
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    start = (content if init is None else init).detach().clamp(0.0, 1.0)
    if alternative is not None:
        if alternative.shape != content.shape:
            raise ValueError(f"alternative {tuple(alternative.shape)} != content {tuple(content.shape)}")
        other = alternative.detach().clamp(0.0, 1.0)
        with torch.inference_mode():
            losses = []
            for candidate in (start, other):  # the loss buffers hold one row per tile
                with _autocast(device, dtype):
                    feats = features(candidate, layers)
                losses.append(loss_fn(feats).float())
        better = (losses[1] < losses[0]).view(n, 1, 1, 1)
        start = torch.where(better, other, start)
    x = start.clone().requires_grad_(True)
    adam = torch.optim.Adam([x], lr=settings.lr) if settings.optimizer == "adam" else None
    lbfgs = _PerTileLBFGS(x, settings.history) if adam is None else None
    every = max(1, settings.report_every)
    ran = settings.iterations
    checked = -every  # the last iteration whose iterate got a float32 check of stop_at

    def report(iteration: int, loss: float, done: int) -> None:
        if progress is not None:
            progress(
                Progress(
                    scale=ctx.scale, grid=ctx.grid, batch=ctx.batch, n_batches=ctx.n_batches,
                    iteration=iteration, iterations=settings.iterations, loss=loss,
                    tiles_done=ctx.tiles_done + done, tiles_total=ctx.tiles_total,
                )
            )

    def exact_loss(image: Tensor) -> Tensor:
        """The float32 loss per tile (no autocast): what the result is judged by."""
        with torch.inference_mode():
            losses: Tensor = loss_fn(features(image, layers)).float().clone()
        return losses

    for it in range(settings.iterations):
        x.grad = None
        with _autocast(device, dtype):
            feats = features(x, layers)
        per_tile = loss_fn(feats)
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
        if scaler is not None and adam is not None:
            scaler.scale(total).backward()
            scaler.step(adam)
            scaler.update()
        else:
            total.backward()
            if adam is not None:
                adam.step()
            elif lbfgs is not None:
                lbfgs.step(per_tile)
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        if (it + 1) % every == 0 and it + 1 < settings.iterations:
            report(it + 1, float(per_tile.detach().mean()), 0)
    x.grad = None

    result = x.detach()
    final = exact_loss(result)
    report(settings.iterations, float(final.mean()), n)
    iterations = torch.full((n,), ran, dtype=torch.int64)
    return BatchResult(images=result, losses=final, iterations=iterations)
