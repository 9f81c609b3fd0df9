"""``mr2nst train-fast``: train the fast student of the site's mr2nst method.

The work is :func:`mr2nst.node.lab.train_fast.train_fast`; docs/operations.md, "Fast
mode", describes the command, its cache and its checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK
from mr2nst.node.lab import train_fast as lab

_DEFAULTS = lab.FastTrainingSettings


def add_parser(sub: Any) -> None:
    """Register ``mr2nst train-fast``."""
    p = sub.add_parser(
        "train-fast", help="train the fast student that imitates this config's mr2nst method"
    )
    p.add_argument("--source", required=True, metavar="GE_DIR", help="source (GE) DICOM files")
    p.add_argument(
        "--config", required=True, help="node config: the teacher (engine, bank, refiner)"
    )
    p.add_argument("--out", required=True, metavar="PATH", help="student checkpoint to write")
    p.add_argument("--epochs", type=int, help="total epochs (a resumed run continues to it)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT")
    p.add_argument(
        "--teacher-cache", metavar="DIR", help="teacher outputs (default: OUT.parent/...)"
    )
    p.add_argument("--width", type=int, default=_DEFAULTS.width, help="channels at full size")
    p.add_argument("--depth", type=int, default=_DEFAULTS.depth, help="stride-2 levels")
    p.add_argument("--crop", type=int, default=_DEFAULTS.crop, help="crop side in native pixels")
    p.add_argument("--batch", type=int, default=_DEFAULTS.batch)
    p.add_argument(
        "--crops-per-image", type=int, default=_DEFAULTS.crops_per_image, help="per epoch"
    )
    p.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    p.add_argument(
        "--detail-weight",
        type=float,
        default=_DEFAULTS.detail_weight,
        help="extra L1 weight on bright local peaks (µCs) of the start image",
    )
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.set_defaults(func=cmd_train_fast)


def cmd_train_fast(args: argparse.Namespace) -> int:
    """Train the student; exit 0 once every epoch up to ``--epochs`` is saved.

    Raises:
        UsageError: bad inputs or saved state (exit 2, one line).
        ConfigError: the config is invalid (exit 2).
    """
    lab.train_fast(
        lab.FastTrainingSettings(
            source=args.source,
            config=args.config,
            out=Path(args.out),
            epochs=args.epochs,
            resume=args.resume,
            teacher_cache=Path(args.teacher_cache) if args.teacher_cache else None,
            width=args.width,
            depth=args.depth,
            crop=args.crop,
            batch=args.batch,
            crops_per_image=args.crops_per_image,
            lr=args.lr,
            detail_weight=args.detail_weight,
            seed=args.seed,
            progress=sys.stderr.isatty(),
        )
    )
    return EXIT_OK
