"""``mr2nst demo``: the self-contained end-to-end run on this machine."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK, EXIT_RUNTIME


def add_parser(sub: Any) -> None:
    """Register ``mr2nst demo``."""
    p = sub.add_parser("demo", help="self-contained end-to-end run on this machine")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--n", type=int, default=3, help="number of phantom GE images to send")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(2294, 1914))
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (:func:`mr2nst.node.lab.demo.run_demo`); exit 0 when every check passed."""
    from mr2nst.node.lab.demo import run_demo

    return (
        EXIT_OK
        if run_demo(Path(args.out), n=args.n, size=(args.size[0], args.size[1]))
        else EXIT_RUNTIME
    )
