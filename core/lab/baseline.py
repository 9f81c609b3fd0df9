"""The plain reference loop: the straightforward implementation of the paper (METHOD.md).

It exists to be compared against :class:`~mr2nst.core.engine.Mr2nstEngine` by
``mr2nst bench``. The *loss* is the engine's, built from the same pieces: the same tiles
(:func:`~mr2nst.core.tiling.tiles_for`), patch shapes and resize, the same per-tile
multi-reference Gram target (:func:`~mr2nst.core.targets.multi_reference_target` of the
same reference crops) and the same ``content + α·style``
(:class:`~mr2nst.core.losses.TransferLoss`). Only the *procedure* is the plain one:

- one tile at a time (no batching), scale after scale;
- each tile's targets are computed for that tile alone, under ``no_grad`` (no cache, no
  ``inference_mode``);
- float32 throughout (no autocast, no channels-last);
- every tile, including the ones that are nearly all background (the engine skips them);
- every tile starts from the content image (no EHM start, no warm start from the
  previous scale);
- Adam at ``config.lr`` for a fixed number of iterations, clamping to [0, 1] after each
  step, like the engine's default.

The final loss of a tile is the loss of its final, clamped iterate, as in the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from mr2nst.core.engine_config import EngineConfig
from mr2nst.core.features import CONTENT_LAYER, STYLE_LAYERS, VGGFeatures
from mr2nst.core.losses import TransferLoss, gram
from mr2nst.core.targets import multi_reference_target
from mr2nst.core.tiling import (
    Tile,
    patch_shape,
    resize_patch,
    stitch,
    tile_is_background,
    tiles_for,
)


@dataclass(frozen=True)
class TracePoint:
    """The loss of one tile at one iteration, ``seconds`` after the loop started."""

    seconds: float
    scale: int
    tile: int
    iteration: int
    loss: float


@dataclass(frozen=True)
class PlainResult:
    """What the plain loop did, per scale and tile (row-major, *all* tiles).

    ``background[k][t]`` says whether the engine would skip tile t of scale k;
    ``trace`` samples each tile's loss every ``trace_every`` iterations and at its end.
    """

    scales: tuple[Tensor, ...]
    final_losses: tuple[tuple[float, ...], ...]
    background: tuple[tuple[bool, ...], ...]
    tile_seconds: tuple[tuple[float, ...], ...]
    iterations: int
    seconds: float
    trace: tuple[TracePoint, ...]


def _tile_target(features: VGGFeatures, refs: Sequence[Tensor]) -> dict[str, Tensor]:
    """The tile's multi-reference target, one reference crop ``(1, 1, h, w)`` at a time."""
    with torch.no_grad():
        grams: dict[str, list[Tensor]] = {name: [] for name in STYLE_LAYERS}
        for ref in refs:
            feats = features(ref, STYLE_LAYERS)
            for name in STYLE_LAYERS:
                grams[name].append(gram(feats[name]))
        return {name: multi_reference_target(torch.stack(g, dim=1)) for name, g in grams.items()}


def _plain_tile(
    features: VGGFeatures,
    content: Tensor,
    refs: Sequence[Tensor],
    config: EngineConfig,
    iterations: int,
    on_loss: Callable[[int, float], None],
) -> tuple[Tensor, float]:
    """Adam from the content on one ``(1, 1, h, w)`` tile; returns it and its final loss."""
    with torch.no_grad():
        content_feats = features(content, (CONTENT_LAYER,))[CONTENT_LAYER]
    loss_fn = TransferLoss(content_feats, _tile_target(features, refs), config.alpha)
    x = content.detach().clone().clamp_(0.0, 1.0).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=config.lr)
    for it in range(iterations):
        opt.zero_grad()
        loss = loss_fn(features(x, loss_fn.layers)).sum()
        on_loss(it, float(loss.detach()))
        loss.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    with torch.no_grad():
        final = float(loss_fn(features(x, loss_fn.layers)).sum())
    return x.detach(), final


@dataclass
class _Trace:
    """Collects :class:`TracePoint` s, timed from ``started``."""

    started: float
    every: int
    points: list[TracePoint] = field(default_factory=list)

    def add(self, scale: int, tile: int, iteration: int, loss: float) -> None:
        """Record ``loss`` of ``tile`` of ``scale`` at ``iteration``."""
        seconds = time.perf_counter() - self.started
        self.points.append(TracePoint(seconds, scale, tile, iteration, loss))

    def sampler(self, scale: int, tile: int) -> Callable[[int, float], None]:
        """A per-iteration callback that records every ``every``-th loss of one tile."""

        def on_loss(it: int, loss: float) -> None:
            if it % self.every == 0:
                self.add(scale, tile, it, loss)

        return on_loss


def _plain_scale(
    features: VGGFeatures,
    content: Tensor,
    references: Sequence[Tensor],
    config: EngineConfig,
    iterations: int,
    scale: int,
    tiles: Sequence[Tile],
    trace: _Trace,
) -> tuple[Tensor, tuple[float, ...], tuple[float, ...]]:
    """The plain loop over one scale's ``tiles``, one at a time: the stitched scale, and
    each tile's final loss and seconds."""
    shape = (int(content.shape[0]), int(content.shape[1]))
    outputs: list[Tensor] = []
    losses: list[float] = []
    tile_s: list[float] = []
    for n, tile in enumerate(tiles):
        tile_start = time.perf_counter()
        size = patch_shape(tile.shape, config.patch_size)
        crop = resize_patch(content[tile.slices][None, None], size)
        refs = [
            resize_patch(r[tile.box_on((int(r.shape[0]), int(r.shape[1])))][None, None], size)
            for r in references
        ]
        on_loss = trace.sampler(scale, n)
        out, final = _plain_tile(features, crop, refs, config, iterations, on_loss)
        trace.add(scale, n, iterations, final)
        outputs.append(resize_patch(out, tile.shape)[0, 0])
        losses.append(final)
        tile_s.append(time.perf_counter() - tile_start)
    return stitch(tiles, outputs, shape), tuple(losses), tuple(tile_s)


def plain_transfer(
    features: VGGFeatures,
    content: Tensor,
    mask: npt.NDArray[np.bool_],
    references: Sequence[Tensor],
    config: EngineConfig,
    iterations: int | None = None,
    trace_every: int = 10,
) -> PlainResult:
    """Run the plain loop on the ``(H, W)`` ``content`` with ``(h_k, w_k)`` ``references``.

    ``config`` supplies the loss and tiling settings (patch size, grids, overlap, alpha,
    lr, background fraction); ``iterations`` defaults to ``config.iterations``.
    """
    n_iter = config.iterations if iterations is None else iterations
    started = time.perf_counter()
    shape = (int(content.shape[0]), int(content.shape[1]))
    trace = _Trace(started, trace_every)
    scales: list[Tensor] = []
    finals: list[tuple[float, ...]] = []
    backgrounds: list[tuple[bool, ...]] = []
    seconds: list[tuple[float, ...]] = []
    for k, g in enumerate(config.grids):
        tiles: list[Tile] = tiles_for(shape, g, config.overlap, scale=k)
        scale, losses, tile_s = _plain_scale(
            features, content, references, config, n_iter, k, tiles, trace
        )
        scales.append(scale)
        finals.append(losses)
        backgrounds.append(
            tuple(tile_is_background(mask[t.slices], config.background_fraction) for t in tiles)
        )
        seconds.append(tile_s)
    return PlainResult(
        scales=tuple(scales),
        final_losses=tuple(finals),
        background=tuple(backgrounds),
        tile_seconds=tuple(seconds),
        iterations=n_iter,
        seconds=time.perf_counter() - started,
        trace=tuple(trace.points),
    )
