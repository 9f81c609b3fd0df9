"""``mr2nst transfer``: normalize files offline with the node's own pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK, EXIT_RUNTIME, print_json
from mr2nst.node.config import load_config


def add_parser(sub: Any) -> None:
    """Register ``mr2nst transfer``."""
    p = sub.add_parser("transfer", help="normalize files offline with the same pipeline")
    p.add_argument("inputs", nargs="+", metavar="IN")
    p.add_argument("--out", required=True)
    p.add_argument("--config")
    p.add_argument(
        "--method",
        default="passthrough",
        help="passthrough, ehm, spectral, mr2nst, fast or cyclegan (its [section] configured)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_transfer)


def cmd_transfer(args: argparse.Namespace) -> int:
    """Normalize files offline with the node's pipeline; exit 1 when any input failed."""
    from mr2nst.node.service.transfer import run_transfer

    config = load_config(args.config)
    results = run_transfer(
        config, args.inputs, Path(args.out), method=args.method, progress=sys.stderr.isatty()
    )
    failed = [r for r in results if r["error"]]
    if args.json:
        print_json(
            {"written": len(results) - len(failed), "failed": len(failed), "results": results}
        )
    else:
        for r in failed:
            print(f"FAILED {r['input']}: {r['error']}", file=sys.stderr)
        print(
            f"wrote {len(results) - len(failed)} of {len(results)} derived instances to {args.out}"
        )
    return EXIT_OK if not failed else EXIT_RUNTIME
