"""``mr2nst phantom``: write synthetic paired GE/UIH mammograms."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK
from mr2nst.node.errors import UsageError


def add_parser(sub: Any) -> None:
    """Register ``mr2nst phantom``."""
    p = sub.add_parser("phantom", help="write synthetic paired GE/UIH mammograms")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(2294, 1914))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vendor", choices=["ge", "uih", "both"], default="both")
    p.add_argument("--j2k", action="store_true", help="JPEG 2000 lossless")
    p.add_argument("--photometric", choices=["MONOCHROME1", "MONOCHROME2"])
    p.add_argument("--bits", type=int, choices=[12, 14, 16])
    p.set_defaults(func=cmd_phantom)


def cmd_phantom(args: argparse.Namespace) -> int:
    """Write a paired phantom set (:mod:`mr2nst.node.lab.phantom_io`).

    Raises:
        UsageError: a size, count or option the phantom cannot be made with (exit 2).
    """
    from mr2nst.core.errors import ImageError
    from mr2nst.node.lab.phantom_io import run_phantom_command

    vendors = ("GE", "UIH") if args.vendor == "both" else (args.vendor.upper(),)
    try:
        paths = run_phantom_command(
            Path(args.out),
            n=args.n,
            size=(args.size[0], args.size[1]),
            seed=args.seed,
            vendors=vendors,
            j2k=args.j2k,
            photometric=args.photometric,
            bits=args.bits,
            progress=sys.stderr.isatty(),
        )
    except (ValueError, ImageError) as exc:
        raise UsageError(f"phantom: {exc}") from None
    print(f"wrote {len(paths)} files under {args.out}")
    return EXIT_OK
