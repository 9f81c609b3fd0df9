"""``mr2nst train-refiner``: train the refiner on a site's images.

The work is :func:`mr2nst.node.lab.train_refiner.train_refiner`; docs/operations.md,
"Training the refiner", describes the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK
from mr2nst.node.lab import train_refiner as lab

_DEFAULTS = lab.RefinerTrainingSettings


def add_parser(sub: Any) -> None:
    """Register ``mr2nst train-refiner``."""
    p = sub.add_parser("train-refiner", help="train the refiner that merges the scales (GAN step)")
    p.add_argument("--source", required=True, metavar="DIR", help="source-domain (GE) DICOM files")
    p.add_argument("--target", required=True, metavar="DIR", help="target-domain (UIH) DICOM files")
    p.add_argument("--out", required=True, metavar="PATH", help="refiner checkpoint to write")
    p.add_argument("--config", help="node config (engine and bank settings)")
    p.add_argument(
        "--epochs",
        type=int,
        default=_DEFAULTS.epochs,
        help="total epochs (a resumed run continues to it)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT.state")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--crop", type=int, default=_DEFAULTS.crop, help="crop side in native pixels")
    p.add_argument("--batch", type=int, default=_DEFAULTS.batch)
    p.add_argument(
        "--steps",
        type=int,
        default=_DEFAULTS.steps,
        help=f"steps per epoch (default: {lab.CROPS_PER_SOURCE} crops per source image)",
    )
    p.add_argument("--lr-g", type=float, default=_DEFAULTS.lr_g, help="refiner learning rate")
    p.add_argument("--lr-d", type=float, default=_DEFAULTS.lr_d, help="discriminator learning rate")
    p.add_argument("--cache", metavar="DIR", help="scale cache (default: OUT.parent/refiner-cache)")
    p.add_argument("--source-manufacturer", default=_DEFAULTS.source_manufacturer, metavar="GLOB")
    p.add_argument("--target-manufacturer", default=_DEFAULTS.target_manufacturer, metavar="GLOB")
    p.add_argument(
        "--d-weights", metavar="PATH", help="torchvision resnet18 ImageNet weights for D (optional)"
    )
    p.set_defaults(func=cmd_train_refiner)


def settings_of(args: argparse.Namespace) -> lab.RefinerTrainingSettings:
    """The parsed options as the lab's settings (progress bars when stderr is a terminal)."""
    return lab.RefinerTrainingSettings(
        source=args.source,
        target=args.target,
        out=Path(args.out),
        config=args.config,
        epochs=args.epochs,
        resume=args.resume,
        seed=args.seed,
        crop=args.crop,
        batch=args.batch,
        steps=args.steps,
        lr_g=args.lr_g,
        lr_d=args.lr_d,
        cache=Path(args.cache) if args.cache else None,
        source_manufacturer=args.source_manufacturer,
        target_manufacturer=args.target_manufacturer,
        d_weights=args.d_weights,
        progress=sys.stderr.isatty(),
    )


def cmd_train_refiner(args: argparse.Namespace) -> int:
    """Train the refiner; exit 0 once every epoch up to ``--epochs`` is saved.

    Raises:
        UsageError: an input, option or saved state that does not fit (exit 2).
    """
    lab.train_refiner(settings_of(args))
    return EXIT_OK
