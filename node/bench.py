"""``mr2nst bench``: the engine against the plain reference loop, in one run (issue #4).

Both transfer the same phantom: a GE rendering of ``--size`` (default 2294×1914), styled
with the UIH renderings of 5 other phantoms of the same view and laterality, every image
robust-scaled as the node does (:func:`~mr2nst.node.method_mr2nst.robust_unit`). The
loss is the same for both (:mod:`mr2nst.core.baseline`); the features are always
``seeded-random`` (no weights are downloaded).

Runs, each in its own spawned child process so that its peak memory is its own
(``ru_maxrss``; on CUDA also ``torch.cuda.max_memory_allocated``):

1. ``plain``: :func:`~mr2nst.core.baseline.plain_transfer`, ``--iterations`` of Adam per
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

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

PHANTOM_REFERENCES = 5


def add_parser(sub: Any) -> None:
    """Register ``mr2nst bench``."""
    p = sub.add_parser("bench", help="engine speed and memory against the plain reference loop")
    p.add_argument("--size", nargs=2, type=int, default=(2294, 1914), metavar=("H", "W"))
    p.add_argument("--patch-size", type=int, default=128, help="patch size of both (default 128)")
    p.add_argument("--iterations", type=int, default=400,
                   help="plain loop's Adam iterations per tile, and the engine's cap")
    p.add_argument("--grids", type=int, nargs="+", default=None, help="default: the engine's")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--init", choices=("content", "ehm"), default="content")
    p.add_argument("--lr", type=float, default=None,
                   help="the engine's Adam learning rate (default: the engine's, as the plain loop)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="the engine's mixed precision (CUDA, and CPUs with native bf16)")
    p.add_argument("--default-run", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the default config on the full image (default: on CUDA)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads in each run (0: torch's default); use 1 on a shared "
                        "machine, where oversubscribed OpenMP threads distort timings")
    p.add_argument("--json", action="store_true", help="print only the JSON")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=cmd_bench)


def _inputs(size: tuple[int, int], seed: int, init: str) -> dict[str, Any]:
    """Content, mask, references (robust-scaled) and, for ``init = ehm``, the EHM start."""
    import numpy as np

    from mr2nst.core.ehm import exact_histogram_match
    from mr2nst.core.phantom import PhantomSpec, make_case

    from .method_mr2nst import robust_unit

    h, w = size
    case = make_case(PhantomSpec(height=h, width=w, seed=seed))
    refs = [make_case(PhantomSpec(height=h, width=w, seed=seed + 1 + k))
            for k in range(PHANTOM_REFERENCES)]
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


def _child(kind: str, config: dict[str, Any], inputs: dict[str, Any],
           stop_at: dict[tuple[int, int, int], float] | None, threads: int) -> dict[str, Any]:
    """One measured run (in a spawned process): ``plain`` or ``engine``."""
    import time

    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from mr2nst.core.baseline import plain_transfer
    from mr2nst.core.engine import EngineConfig, Mr2nstEngine, Progress, resolved_device
    from mr2nst.core.features import build_features

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
            "trace": [[round(p.seconds, 3), p.scale, p.tile, p.iteration, p.loss]
                      for p in result.trace],
            **_memory(device),
        }
    engine = Mr2nstEngine(cfg)
    trace: list[list[float]] = []
    started = time.perf_counter()

    def progress(p: Progress) -> None:
        trace.append([round(time.perf_counter() - started, 3), p.scale, p.batch, p.iteration, p.loss])

    res = engine.transfer(inputs["content"], inputs["mask"], inputs["references"],
                          init=inputs["init"], progress=progress, stop_at=stop_at)
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


def _spawned(kind: str, config: dict[str, Any], inputs: dict[str, Any],
             stop_at: dict[tuple[int, int, int], float] | None = None, threads: int = 0,
             ) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        out: dict[str, Any] = pool.submit(_child, kind, config, inputs, stop_at, threads).result()
    return out


def _compare(plain: dict[str, Any], engine: dict[str, Any], tiles: list[list[Any]]) -> dict[str, Any]:
    """Per scale: the engine's summed loss against the plain loop's on the same tiles
    (those the engine optimised); per-tile counts are reported alongside."""
    scales = []
    for k, (p_losses, bg, e_losses) in enumerate(
            zip(plain["final_losses"], plain["background"], engine["final_losses"], strict=True)):
        active = [loss for loss, skip in zip(p_losses, bg, strict=True) if not skip]
        ok = [e <= p for e, p in zip(e_losses, active, strict=True)]
        scales.append({
            "scale": k, "grid": tiles[k][0], "tiles": len(p_losses), "optimised": len(active),
            "plain_loss": math.fsum(active), "engine_loss": math.fsum(e_losses),
            "tiles_at_or_below_plain": sum(ok),
            "reached": math.fsum(e_losses) <= math.fsum(active),
        })
    return {"scales": scales, "reached": all(s["reached"] for s in scales)}


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench and print its JSON."""
    import os
    from dataclasses import asdict

    import torch

    from mr2nst.core.engine import EngineConfig, resolved_device
    from mr2nst.core.engine_config import PAPER_RECIPE
    from mr2nst.core.optimize import amp_dtype
    from mr2nst.core.tiling import tiles_for

    size = (int(args.size[0]), int(args.size[1]))
    base = EngineConfig(features="seeded-random", device=args.device)
    grids = tuple(args.grids) if args.grids else base.grids
    plain_cfg = EngineConfig(**{**PAPER_RECIPE, "features": "seeded-random", "device": args.device,  # type: ignore[arg-type]
                                "patch_size": args.patch_size, "iterations": args.iterations, "grids": grids})
    engine_cfg = EngineConfig(**{**asdict(plain_cfg), "optimizer": args.optimizer,
                                 "warm_start": args.warm_start, "init": args.init,
                                 "lr": plain_cfg.lr if args.lr is None else args.lr, "amp": args.amp})
    device = resolved_device(plain_cfg)
    say = (lambda *_: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"bench: {size[0]}x{size[1]}, patch {args.patch_size}, {args.iterations} it, on {device}")
    inputs = _inputs(size, args.seed, args.init)
    tiles = [[g, len(tiles_for(size, g, plain_cfg.overlap))] for g in grids]

    plains: list[dict[str, Any]] = []
    engines: list[dict[str, Any]] = []
    stop_at: dict[tuple[int, int, int], float] | None = None
    for r in range(max(1, args.repeats)):
        plains.append(_spawned("plain", asdict(plain_cfg), inputs, None, args.threads))
        say(f"plain #{r + 1}: {plains[-1]['seconds']:.1f} s")
        if stop_at is None:
            stop_at = {}
            for k, g in enumerate(grids):
                for t, (loss, bg) in enumerate(zip(plains[0]["final_losses"][k],
                                                   plains[0]["background"][k], strict=True)):
                    if not bg:  # a hair below, so that rounding in the final pass stays below
                        stop_at[(k, t // g, t % g)] = loss * (1.0 - 1e-4)
        engines.append(_spawned("engine", asdict(engine_cfg), inputs, stop_at, args.threads))
        say(f"engine #{r + 1}: {engines[-1]['seconds']:.1f} s")

    plain_s = statistics.median(p["seconds"] for p in plains)
    engine_s = statistics.median(e["seconds"] for e in engines)
    comparison = _compare(plains[0], engines[0], tiles)
    report: dict[str, Any] = {
        "bench": "mr2nst engine vs plain loop",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
                    platform.processor() or platform.machine(),
                    "torch_threads": args.threads or torch.get_num_threads()},
        "image": list(size), "patch_size": args.patch_size, "grids": list(grids),
        "tiles_per_scale": tiles, "plain_iterations": args.iterations,
        "engine_options": {"optimizer": args.optimizer, "warm_start": args.warm_start,
                           "init": args.init, "lr": engine_cfg.lr, "amp": args.amp,
                           "autocast": str(amp_dtype(device, args.amp)), "max_batch": engine_cfg.max_batch,
                           "memory_budget_mb": engine_cfg.memory_budget_mb,
                           "iteration_cap": engine_cfg.iterations},
        "repeats": len(plains),
        "plain": {**plains[0], "seconds": plain_s, "all_seconds": [p["seconds"] for p in plains]},
        "engine": {**engines[0], "seconds": engine_s, "all_seconds": [e["seconds"] for e in engines]},
        "comparison": comparison,
        "speedup": plain_s / engine_s if comparison["reached"] else None,
        "target_speedup": 3.0,
    }
    run_default = args.default_run if args.default_run is not None else device.type == "cuda"
    if run_default:
        default_cfg = EngineConfig(features="seeded-random", device=args.device)
        default = _spawned("engine", asdict(default_cfg), {**inputs, "init": None}, None, args.threads)
        say(f"default config: {default['seconds']:.1f} s")
        report["default"] = {k: v for k, v in default.items() if k != "trace"}
        report["default"]["targets"] = {"seconds": 15.0, "cuda_max_allocated_mb": 6144.0}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0
