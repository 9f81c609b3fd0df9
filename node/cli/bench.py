"""``mr2nst bench``: the engine against the plain reference loop (:mod:`mr2nst.node.lab.bench`)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from mr2nst.node.lab import bench as lab


def add_parser(sub: Any) -> None:
    """Register ``mr2nst bench``."""
    p = sub.add_parser("bench", help="engine speed and memory against the plain reference loop")
    p.add_argument("--size", nargs=2, type=int, default=(2294, 1914), metavar=("H", "W"))
    p.add_argument("--patch-size", type=int, default=128, help="patch size of both (default 128)")
    p.add_argument(
        "--iterations",
        type=int,
        default=400,
        help="plain loop's Adam iterations per tile, and the engine's cap",
    )
    p.add_argument("--grids", type=int, nargs="+", default=None, help="default: the engine's")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--init", choices=("content", "ehm"), default="content")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="the engine's Adam learning rate (default: the engine's, as the plain loop)",
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the engine's mixed precision (CUDA, and CPUs with native bf16)",
    )
    p.add_argument(
        "--default-run",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the default config on the full image (default: on CUDA)",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads in each run (0: torch's default); use 1 on a shared "
        "machine, where oversubscribed OpenMP threads distort timings",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=cmd_bench)


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
    plain_cfg = EngineConfig(
        **{
            **PAPER_RECIPE,
            "features": "seeded-random",
            "device": args.device,  # type: ignore[arg-type]
            "patch_size": args.patch_size,
            "iterations": args.iterations,
            "grids": grids,
        }
    )
    engine_cfg = EngineConfig(
        **{
            **asdict(plain_cfg),
            "optimizer": args.optimizer,
            "warm_start": args.warm_start,
            "init": args.init,
            "lr": plain_cfg.lr if args.lr is None else args.lr,
            "amp": args.amp,
        }
    )
    device = resolved_device(plain_cfg)
    say = (lambda *_: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"bench: {size[0]}x{size[1]}, patch {args.patch_size}, {args.iterations} it, on {device}")
    inputs = lab.inputs(size, args.seed, args.init)
    tiles = [[g, len(tiles_for(size, g, plain_cfg.overlap))] for g in grids]

    plains: list[dict[str, Any]] = []
    engines: list[dict[str, Any]] = []
    stop_at: dict[tuple[int, int, int], float] | None = None
    for r in range(max(1, args.repeats)):
        plains.append(lab.spawned("plain", asdict(plain_cfg), inputs, None, args.threads))
        say(f"plain #{r + 1}: {plains[-1]['seconds']:.1f} s")
        if stop_at is None:
            stop_at = {}
            for k, g in enumerate(grids):
                for t, (loss, bg) in enumerate(
                    zip(plains[0]["final_losses"][k], plains[0]["background"][k], strict=True)
                ):
                    if not bg:  # a hair below, so that rounding in the final pass stays below
                        stop_at[(k, t // g, t % g)] = loss * (1.0 - 1e-4)
        engines.append(lab.spawned("engine", asdict(engine_cfg), inputs, stop_at, args.threads))
        say(f"engine #{r + 1}: {engines[-1]['seconds']:.1f} s")

    plain_s = statistics.median(p["seconds"] for p in plains)
    engine_s = statistics.median(e["seconds"] for e in engines)
    comparison = lab.compare(plains[0], engines[0], tiles)
    report: dict[str, Any] = {
        "bench": "mr2nst engine vs plain loop",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch_threads": args.threads or torch.get_num_threads(),
        },
        "image": list(size),
        "patch_size": args.patch_size,
        "grids": list(grids),
        "tiles_per_scale": tiles,
        "plain_iterations": args.iterations,
        "engine_options": {
            "optimizer": args.optimizer,
            "warm_start": args.warm_start,
            "init": args.init,
            "lr": engine_cfg.lr,
            "amp": args.amp,
            "autocast": str(amp_dtype(device, args.amp)),
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
        "target_speedup": 3.0,
    }
    run_default = args.default_run if args.default_run is not None else device.type == "cuda"
    if run_default:
        default_cfg = EngineConfig(features="seeded-random", device=args.device)
        default = lab.spawned(
            "engine", asdict(default_cfg), {**inputs, "init": None}, None, args.threads
        )
        say(f"default config: {default['seconds']:.1f} s")
        report["default"] = {k: v for k, v in default.items() if k != "trace"}
        report["default"]["targets"] = {"seconds": 15.0, "cuda_max_allocated_mb": 6144.0}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0
