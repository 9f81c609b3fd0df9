"""``mr2nst train-cyclegan``: train the CycleGAN baseline on unpaired GE and UIH images.

The work is :func:`mr2nst.node.lab.train_cyclegan.train_cyclegan`; docs/evaluation.md,
"CycleGAN baseline", describes the command and its checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK
from mr2nst.node.lab import train_cyclegan as lab

_DEFAULTS = lab.CycleGanTrainingSettings


def add_parser(sub: Any) -> None:
    """Register ``mr2nst train-cyclegan``."""
    p = sub.add_parser(
        "train-cyclegan", help="train the CycleGAN baseline (method cyclegan) on unpaired images"
    )
    p.add_argument("--source", required=True, metavar="GE_DIR", help="source (GE) DICOM files")
    p.add_argument("--target", required=True, metavar="UIH_DIR", help="target (UIH) DICOM files")
    p.add_argument("--out", required=True, metavar="PATH", help="checkpoint to write")
    p.add_argument(
        "--epochs",
        type=int,
        default=_DEFAULTS.epochs,
        help="total epochs (a resumed run continues to it)",
    )
    p.add_argument("--steps-per-epoch", type=int, default=_DEFAULTS.steps_per_epoch)
    p.add_argument("--crop", type=int, default=_DEFAULTS.crop, help="crop side in native pixels")
    p.add_argument("--batch", type=int, default=_DEFAULTS.batch, help="crops of each domain")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--width", type=int, default=_DEFAULTS.width, help="channels at full size")
    p.add_argument("--depth", type=int, default=_DEFAULTS.depth, help="stride-2 levels")
    p.add_argument(
        "--blocks", type=int, default=_DEFAULTS.blocks, help="residual blocks at the bottom"
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default=_DEFAULTS.device, help="where to train"
    )
    p.add_argument("--progress", action="store_true", help="one JSON line per epoch on stderr")
    p.set_defaults(func=cmd_train_cyclegan)


def cmd_train_cyclegan(args: argparse.Namespace) -> int:
    """Train; exit 0 once every epoch up to ``--epochs`` is saved.

    Raises:
        UsageError: bad inputs, settings or saved state (exit 2, one line).
    """
    summary = lab.train_cyclegan(
        lab.CycleGanTrainingSettings(
            source=args.source,
            target=args.target,
            out=Path(args.out),
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            crop=args.crop,
            batch=args.batch,
            resume=args.resume,
            seed=args.seed,
            width=args.width,
            depth=args.depth,
            blocks=args.blocks,
            progress=args.progress,
            device=args.device,
        )
    )
    print(f"trained {summary['epochs']} epochs ({summary['seconds']} s); checkpoint: {args.out}")
    return EXIT_OK
