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
    p = sub.add_parser("bench", help="engine speed and memory against the plain reference loop")
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


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet(_line: str) -> None:
    pass


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the bench, print its JSON (and write it to ``--out``); exit 0 whatever it found.

    Progress lines go to stderr unless ``--json`` is given.
    """
    report = lab.run_bench(settings_of(args), say=_stderr if not args.json else _quiet)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return EXIT_OK
