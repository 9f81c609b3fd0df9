"""The engine against the plain reference loop on one phantom: the work of ``mr2nst bench``.

Each run goes to its own spawned process, so that its peak memory is its own. What is
run and compared, and the figures measured so far: benchmarks/README.md, "engine.py".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

PHANTOM_REFERENCES = 5
#: The issue's GPU targets for the default config on the full image.
DEFAULT_TARGETS = {"seconds": 15.0, "cuda_max_allocated_mb": 6144.0}
TARGET_SPEEDUP = 3.0

StopAt = dict[tuple[int, int, int], float]


@dataclass(frozen=True)
class BenchSettings:
    """One ``mr2nst bench`` run: its command-line options."""

    size: tuple[int, int] = (2294, 1914)
    patch_size: int = 128  # of both runs
    iterations: int = 400  # the plain loop's Adam iterations per tile, and the engine's cap
    grids: tuple[int, ...] | None = None  # None: the engine's
    device: str = "auto"
    optimizer: str = "adam"  # the engine's
    warm_start: bool = True
    init: str = "content"
    lr: float | None = None  # the engine's Adam learning rate; None: the plain loop's
    amp: bool = True
    default_run: bool | None = None  # also time the default config; None: on CUDA
    repeats: int = 1
    seed: int = 0
    threads: int = 0  # torch CPU threads in each run; 0: torch's default


def _silent(_line: str) -> None:
    pass


def run_bench(settings: BenchSettings, say: Callable[[str], None] = _silent) -> dict[str, Any]:
    """Time the plain loop and the engine (and the default config) on one phantom.

    Args:
        settings: the run's options.
        say: receives one line per finished run.

    Returns:
        The report (the JSON ``mr2nst bench`` prints).
    """
    from mr2nst.core.engine import resolved_device
    from mr2nst.core.tiling import tiles_for

    size = settings.size
    plain_cfg, engine_cfg = _configs(settings)
    device = resolved_device(plain_cfg)
    say(
        f"bench: {size[0]}x{size[1]}, patch {settings.patch_size}, "
        f"{settings.iterations} it, on {device}"
    )
    data = inputs(size, settings.seed, settings.init)
    tiles = [[g, len(tiles_for(size, g, plain_cfg.overlap))] for g in plain_cfg.grids]
    plains, engines = _measure(settings, plain_cfg, engine_cfg, data, say)
    report = _report(settings, plain_cfg, engine_cfg, device, tiles, plains, engines)
    run_default = (
        settings.default_run if settings.default_run is not None else device.type == "cuda"
    )
    if run_default:
        report["default"] = _default_run(settings, data, say)
    return report


def _configs(settings: BenchSettings) -> tuple[Any, Any]:
    """The plain loop's config (METHOD.md's recipe) and the engine's (plus its options)."""
    from mr2nst.core.engine import EngineConfig
    from mr2nst.core.engine_config import PAPER_RECIPE

    base = EngineConfig(features="seeded-random", device=settings.device)
    # Any: the recipe's values are checked by EngineConfig's validation, not statically.
    recipe: dict[str, Any] = {
        **PAPER_RECIPE,
        "features": "seeded-random",
        "device": settings.device,
        "patch_size": settings.patch_size,
        "iterations": settings.iterations,
        "grids": tuple(settings.grids) if settings.grids else base.grids,
    }
    plain_cfg = EngineConfig(**recipe)
    engine_cfg = EngineConfig(
        **{
            **asdict(plain_cfg),
            "optimizer": settings.optimizer,
            "warm_start": settings.warm_start,
            "init": settings.init,
            "lr": plain_cfg.lr if settings.lr is None else settings.lr,
            "amp": settings.amp,
        }
    )
    return plain_cfg, engine_cfg


def _measure(
    settings: BenchSettings,
    plain_cfg: Any,
    engine_cfg: Any,
    data: dict[str, Any],
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``repeats`` alternating plain and engine runs; the engine stops at the plain losses."""
    plains: list[dict[str, Any]] = []
    engines: list[dict[str, Any]] = []
    stop_at: StopAt | None = None
    for r in range(max(1, settings.repeats)):
        plains.append(spawned("plain", asdict(plain_cfg), data, None, settings.threads))
        say(f"plain #{r + 1}: {plains[-1]['seconds']:.1f} s")
        if stop_at is None:
            stop_at = plain_stop_at(plains[0], plain_cfg.grids)
        engines.append(spawned("engine", asdict(engine_cfg), data, stop_at, settings.threads))
        say(f"engine #{r + 1}: {engines[-1]['seconds']:.1f} s")
    return plains, engines


def plain_stop_at(plain: dict[str, Any], grids: tuple[int, ...]) -> StopAt:
    """Each breast tile's plain final loss, a hair below (so rounding stays below it)."""
    stop_at: StopAt = {}
    for k, g in enumerate(grids):
        for t, (loss, bg) in enumerate(
            zip(plain["final_losses"][k], plain["background"][k], strict=True)
        ):
            if not bg:
                stop_at[(k, t // g, t % g)] = loss * (1.0 - 1e-4)
    return stop_at


def _machine(device: Any, threads: int) -> dict[str, Any]:
    import os
    import platform

    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch_threads": threads or torch.get_num_threads(),
    }


def _report(
    settings: BenchSettings,
    plain_cfg: Any,
    engine_cfg: Any,
    device: Any,
    tiles: list[list[Any]],
    plains: list[dict[str, Any]],
    engines: list[dict[str, Any]],
) -> dict[str, Any]:
    """The JSON report of the measured runs (medians over the repeats)."""
    from mr2nst.core.optimize import amp_dtype

    plain_s = statistics.median(p["seconds"] for p in plains)
    engine_s = statistics.median(e["seconds"] for e in engines)
    comparison = compare(plains[0], engines[0], tiles)
    return {
        "bench": "mr2nst engine vs plain loop",
        "machine": _machine(device, settings.threads),
        "image": list(settings.size),
        "patch_size": settings.patch_size,
        "grids": list(plain_cfg.grids),
        "tiles_per_scale": tiles,
        "plain_iterations": settings.iterations,
        "engine_options": {
            "optimizer": settings.optimizer,
            "warm_start": settings.warm_start,
            "init": settings.init,
            "lr": engine_cfg.lr,
            "amp": settings.amp,
            "autocast": str(amp_dtype(device, settings.amp)),
            "max_batch": engine_cfg.max_batch,
            "memory_budget_mb": engine_cfg.memory_budget_mb,
            "iteration_cap": engine_cfg.iterations,
        },
        "repeats": len(plains),
        "plain": {**plains[0], "seconds": plain_s, "all_seconds": [p["seconds"] for p in plains]},
        "engine": {
            **engines[0],
            "seconds": engine_s,
            "all_seconds": [e["seconds"] for e in engines],
        },
        "comparison": comparison,
        "speedup": plain_s / engine_s if comparison["reached"] else None,
        "target_speedup": TARGET_SPEEDUP,
    }


def _default_run(
    settings: BenchSettings, data: dict[str, Any], say: Callable[[str], None]
) -> dict[str, Any]:
    """The engine's default config on the full image, without early stop, and its targets."""
    from mr2nst.core.engine import EngineConfig

    default_cfg = EngineConfig(features="seeded-random", device=settings.device)
    default = spawned("engine", asdict(default_cfg), {**data, "init": None}, None, settings.threads)
    say(f"default config: {default['seconds']:.1f} s")
    out = {k: v for k, v in default.items() if k != "trace"}
    out["targets"] = dict(DEFAULT_TARGETS)
    return out


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


# -- the measured runs, each in a spawned process -----------------------------------------------


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
    stop_at: StopAt | None,
    threads: int,
) -> dict[str, Any]:
    """One measured run (in a spawned process): ``plain`` or ``engine``."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from mr2nst.core.engine import EngineConfig, resolved_device

    cfg = EngineConfig(**config)
    device = resolved_device(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if kind == "plain":
        return _plain_run(cfg, device, inputs)
    return _engine_run(cfg, device, inputs, stop_at)


def _plain_run(cfg: Any, device: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """The plain loop: every tile, one at a time, fp32, from the content."""
    import torch

    from mr2nst.core.features import build_features
    from mr2nst.core.lab.baseline import plain_transfer

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


def _engine_run(
    cfg: Any, device: Any, inputs: dict[str, Any], stop_at: StopAt | None
) -> dict[str, Any]:
    """The engine, stopping each scale at ``stop_at``'s losses when given."""
    import time

    from mr2nst.core.engine import Mr2nstEngine, Progress

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
        "tiles_optimized": res.tiles_optimized,
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
    stop_at: StopAt | None = None,
    threads: int = 0,
) -> dict[str, Any]:
    """One run of :func:`_child` in a fresh spawned process: its peak memory is its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        out: dict[str, Any] = pool.submit(_child, kind, config, inputs, stop_at, threads).result()
    return out


def compare(
    plain: dict[str, Any], engine: dict[str, Any], tiles: list[list[Any]]
) -> dict[str, Any]:
    """Per scale: the engine's summed loss against the plain loop's on the same tiles
    (those the engine optimized); per-tile counts are reported alongside."""
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
                "optimized": len(active),
                "plain_loss": math.fsum(active),
                "engine_loss": math.fsum(e_losses),
                "tiles_at_or_below_plain": sum(ok),
                "reached": math.fsum(e_losses) <= math.fsum(active),
            }
        )
    return {"scales": scales, "reached": all(s["reached"] for s in scales)}
