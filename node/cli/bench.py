"""``mr2nst bench``: the engine against the plain reference loop (:mod:`mr2nst.node.lab.bench`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK
from mr2nst.node.lab import bench as lab

_DEFAULTS = lab.BenchSettings


def add_parser(sub: Any) -> None:
    """Register ``mr2nst bench``."""
    p = sub.add_parser(
        "bench",
        help="engine speed and memory against the plain reference loop; with --method "
        "fast, the fast student against its teacher",
    )
    p.add_argument(
        "--method",
        choices=("engine", "fast"),
        default="engine",
        help="engine: the engine against the plain loop (default); fast: the student of "
        "--config's [fast] checkpoint against its teacher, the config's mr2nst method",
    )
    p.add_argument("--config", help="node config (needed by --method fast)")
    p.add_argument(
        "--teacher",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--method fast: also time the teacher once (default: yes)",
    )
    p.add_argument("--size", nargs=2, type=int, default=_DEFAULTS.size, metavar=("H", "W"))
    p.add_argument(
        "--patch-size",
        type=int,
        default=_DEFAULTS.patch_size,
        help="patch size of both (default 128)",
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=_DEFAULTS.iterations,
        help="plain loop's Adam iterations per tile, and the engine's cap",
    )
    p.add_argument("--grids", type=int, nargs="+", default=None, help="default: the engine's")
    p.add_argument("--device", default=_DEFAULTS.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--optimizer", choices=("adam", "lbfgs"), default=_DEFAULTS.optimizer)
    p.add_argument(
        "--warm-start", action=argparse.BooleanOptionalAction, default=_DEFAULTS.warm_start
    )
    p.add_argument("--init", choices=("content", "ehm"), default=_DEFAULTS.init)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="the engine's Adam learning rate (default: the engine's, as the plain loop)",
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=_DEFAULTS.amp,
        help="the engine's mixed precision (CUDA, and CPUs with native bf16)",
    )
    p.add_argument(
        "--default-run",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the default config on the full image (default: on CUDA)",
    )
    p.add_argument("--repeats", type=int, default=_DEFAULTS.repeats)
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument(
        "--threads",
        type=int,
        default=_DEFAULTS.threads,
        help="torch CPU threads in each run (0: torch's default); use 1 on a shared "
        "machine, where oversubscribed OpenMP threads distort timings",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=cmd_bench)


def settings_of(args: argparse.Namespace) -> lab.BenchSettings:
    """The parsed options as the lab's settings."""
    return lab.BenchSettings(
        size=(int(args.size[0]), int(args.size[1])),
        patch_size=args.patch_size,
        iterations=args.iterations,
        grids=tuple(args.grids) if args.grids else None,
        device=args.device,
        optimizer=args.optimizer,
        warm_start=args.warm_start,
        init=args.init,
        lr=args.lr,
        amp=args.amp,
        default_run=args.default_run,
        repeats=args.repeats,
        seed=args.seed,
        threads=args.threads,
    )


def _fast_bench(args: argparse.Namespace) -> dict[str, Any]:
    """``--method fast``: the student against its teacher (``--size``, ``--repeats``,
    ``--seed``, ``--threads`` apply; the engine options do not).

    Raises:
        UsageError: no ``--config``.
    """
    from mr2nst.node.errors import UsageError
    from mr2nst.node.lab.bench_fast import FastBenchSettings, run_fast_bench

    if not args.config:
        raise UsageError("bench --method fast needs --config (with [fast] checkpoint)")
    return run_fast_bench(
        FastBenchSettings(
            config=args.config,
            size=(int(args.size[0]), int(args.size[1])),
            repeats=max(1, args.repeats if args.repeats != _DEFAULTS.repeats else 3),
            seed=args.seed,
            threads=args.threads,
            teacher=args.teacher,
        )
    )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet(_line: str) -> None:
    pass


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench, print its JSON (and write it to ``--out``); exit 0 whatever it found.

    Progress lines go to stderr unless ``--json`` is given.
    """
    if args.method == "fast":
        report = _fast_bench(args)
    else:
        report = lab.run_bench(settings_of(args), say=_stderr if not args.json else _quiet)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return EXIT_OK
