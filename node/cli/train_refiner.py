"""``mr2nst train-refiner``: train the refiner on a site's images.

See :mod:`mr2nst.node.lab.train_refiner`.
"""

from __future__ import annotations

import argparse
from typing import Any

from mr2nst.node.lab import train_refiner as lab


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train-refiner", help="train the refiner that merges the scales (GAN step)")
    p.add_argument("--source", required=True, metavar="DIR", help="source-domain (GE) DICOM files")
    p.add_argument("--target", required=True, metavar="DIR", help="target-domain (UIH) DICOM files")
    p.add_argument("--out", required=True, metavar="PATH", help="refiner checkpoint to write")
    p.add_argument("--config", help="node config (engine and bank settings)")
    p.add_argument(
        "--epochs", type=int, default=10, help="total epochs (a resumed run continues to it)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT.state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=256, help="crop side in native pixels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help=f"steps per epoch (default: {lab.CROPS_PER_SOURCE} crops per source image)",
    )
    p.add_argument("--lr-g", type=float, default=1e-3, help="refiner learning rate")
    p.add_argument("--lr-d", type=float, default=1e-4, help="discriminator learning rate")
    p.add_argument("--cache", metavar="DIR", help="scale cache (default: OUT.parent/refiner-cache)")
    p.add_argument("--source-manufacturer", default="GE*", metavar="GLOB")
    p.add_argument("--target-manufacturer", default="UIH*", metavar="GLOB")
    p.add_argument(
        "--d-weights", metavar="PATH", help="torchvision resnet18 ImageNet weights for D (optional)"
    )
    p.set_defaults(func=cmd_train_refiner)


def cmd_train_refiner(args: argparse.Namespace) -> int:
    """Run the training; see :func:`mr2nst.node.lab.train_refiner.run`."""
    return lab.run(args)
