"""``mr2nst bench``: the engine against the plain reference loop, in one run (issue #4).

Both transfer the same phantom: a GE rendering of ``--size`` (default 2294×1914), styled
with the UIH renderings of 5 other phantoms of the same view and laterality, every image
robust-scaled as the node does (:func:`~mr2nst.core.intensity.robust_unit`). The
loss is the same for both (:mod:`mr2nst.core.lab.baseline`); the features are always
``seeded-random`` (no weights are downloaded).

Runs, each in its own spawned child process so that its peak memory is its own
(``ru_maxrss``; on CUDA also ``torch.cuda.max_memory_allocated``):

1. ``plain``: :func:`~mr2nst.core.lab.baseline.plain_transfer`, ``--iterations`` of Adam per
   tile, every tile, one at a time, fp32, from the content.
2. ``engine``: :class:`~mr2nst.core.engine.Mr2nstEngine` with the bench's engine options
   (``--optimizer``, ``--warm-start``, ``--init``, ``--lr``), capped at ``--iterations``,
   and with ``stop_at`` set to each breast tile's plain final loss: each scale stops as
   soon as its summed loss is at or below the plain loop's on the same tiles. Its wall
   time is the time to reach the plain loop's loss, and ``speedup = plain seconds /
   engine seconds`` is reported only when the engine's loss is equal or lower on every
   scale (summed over the tiles the engine optimises: it skips background tiles by
   design; the plain loop optimises them, and that time counts against it). How many
   tiles are at or below their own plain loss is reported too.
3. ``default`` (``--default-run``; on by default with CUDA): the engine's *default*
   config (patch 512, Adam, 400 iterations, no early stop) on the full image: the
   issue's GPU target (≤ 15 s, ≤ 6 GB peak GPU memory on an H100-class card).

``--repeats`` > 1 repeats runs 1 and 2 alternately and reports medians (the machine may
be shared). Prints one JSON object (also written to ``--out``); exits 0 whether or not a
target is met.
"""

from __future__ import annotations

import math
from typing import Any

PHANTOM_REFERENCES = 5


def inputs(size: tuple[int, int], seed: int, init: str) -> dict[str, Any]:
    """Content, mask, references (robust-scaled) and, for ``init = ehm``, the EHM start."""
    import numpy as np

    from mr2nst.core.ehm import exact_histogram_match
    from mr2nst.core.intensity import robust_unit
    from mr2nst.core.lab.phantom import PhantomSpec, make_case

    h, w = size
    case = make_case(PhantomSpec(height=h, width=w, seed=seed))
    refs = [
        make_case(PhantomSpec(height=h, width=w, seed=seed + 1 + k))
        for k in range(PHANTOM_REFERENCES)
    ]
    content = robust_unit(case.ge, case.mask)
    styles = [robust_unit(r.uih, r.mask) for r in refs]
    start = None
    if init == "ehm":
        pooled = np.concatenate([s[r.mask] for s, r in zip(styles, refs, strict=True)])
        start = exact_histogram_match(content, case.mask, pooled, background=0.0)
    return {"content": content, "mask": case.mask, "references": styles, "init": start}


def _memory(device: Any) -> dict[str, float]:
    import resource

    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _child(
    kind: str,
    config: dict[str, Any],
    inputs: dict[str, Any],
    stop_at: dict[tuple[int, int, int], float] | None,
    threads: int,
) -> dict[str, Any]:
    """One measured run (in a spawned process): ``plain`` or ``engine``."""
    import time

    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from mr2nst.core.engine import EngineConfig, Mr2nstEngine, Progress, resolved_device
    from mr2nst.core.features import build_features
    from mr2nst.core.lab.baseline import plain_transfer

    cfg = EngineConfig(**config)
    device = resolved_device(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if kind == "plain":
        features = build_features(cfg.features, cfg.pooling, cfg.weights, cfg.seed).to(device)
        content = torch.from_numpy(inputs["content"]).to(device)
        refs = [torch.from_numpy(r).to(device) for r in inputs["references"]]
        result = plain_transfer(features, content, inputs["mask"], refs, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        n_tiles = sum(len(x) for x in result.final_losses)
        return {
            "seconds": result.seconds,
            "tile_iterations": n_tiles * result.iterations,
            "seconds_per_tile_iteration": result.seconds / max(1, n_tiles * result.iterations),
            "final_losses": [list(x) for x in result.final_losses],
            "background": [list(x) for x in result.background],
            "trace": [
                [round(p.seconds, 3), p.scale, p.tile, p.iteration, p.loss] for p in result.trace
            ],
            **_memory(device),
        }
    engine = Mr2nstEngine(cfg)
    trace: list[list[float]] = []
    started = time.perf_counter()

    def progress(p: Progress) -> None:
        trace.append(
            [round(time.perf_counter() - started, 3), p.scale, p.batch, p.iteration, p.loss]
        )

    res = engine.transfer(
        inputs["content"],
        inputs["mask"],
        inputs["references"],
        init=inputs["init"],
        progress=progress,
        stop_at=stop_at,
    )
    seconds = time.perf_counter() - started
    tile_its = sum(sum(x) for x in res.iterations_run)
    return {
        "seconds": seconds,
        "tile_iterations": tile_its,
        "seconds_per_tile_iteration": seconds / max(1, tile_its),
        "tiles_optimised": res.tiles_optimised,
        "tiles_skipped": res.tiles_skipped,
        "final_losses": [list(x) for x in res.final_losses],
        "iterations_run": [list(x) for x in res.iterations_run],
        "trace": trace,
        **_memory(device),
    }


def spawned(
    kind: str,
    config: dict[str, Any],
    inputs: dict[str, Any],
    stop_at: dict[tuple[int, int, int], float] | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        out: dict[str, Any] = pool.submit(_child, kind, config, inputs, stop_at, threads).result()
    return out


def compare(
    plain: dict[str, Any], engine: dict[str, Any], tiles: list[list[Any]]
) -> dict[str, Any]:
    """Per scale: the engine's summed loss against the plain loop's on the same tiles
    (those the engine optimised); per-tile counts are reported alongside."""
    scales = []
    for k, (p_losses, bg, e_losses) in enumerate(
        zip(plain["final_losses"], plain["background"], engine["final_losses"], strict=True)
    ):
        active = [loss for loss, skip in zip(p_losses, bg, strict=True) if not skip]
        ok = [e <= p for e, p in zip(e_losses, active, strict=True)]
        scales.append(
            {
                "scale": k,
                "grid": tiles[k][0],
                "tiles": len(p_losses),
                "optimised": len(active),
                "plain_loss": math.fsum(active),
                "engine_loss": math.fsum(e_losses),
                "tiles_at_or_below_plain": sum(ok),
                "reached": math.fsum(e_losses) <= math.fsum(active),
            }
        )
    return {"scales": scales, "reached": all(s["reached"] for s in scales)}
