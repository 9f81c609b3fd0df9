"""``mr2nst echo``: C-ECHO a peer."""

from __future__ import annotations

import argparse
from typing import Any

from mr2nst.node.cli.common import EXIT_OK, EXIT_RUNTIME, add_network_arguments, print_json


def add_parser(sub: Any) -> None:
    """Register ``mr2nst echo``."""
    p = sub.add_parser("echo", help="C-ECHO a peer")
    add_network_arguments(p)
    p.set_defaults(func=cmd_echo)


def cmd_echo(args: argparse.Namespace) -> int:
    from mr2nst.node.dicom.scu import echo

    status, error = echo(
        args.host, args.port, calling=args.aet, called=args.aec, timeout_s=args.timeout
    )
    ok = status == 0
    if args.json:
        print_json({"ok": ok, "status": status, "error": error})
    else:
        print(
            f"C-ECHO {args.aec}@{args.host}:{args.port}: "
            + (f"status 0x{status:04X}" if status is not None else error)
        )
    return EXIT_OK if ok else EXIT_RUNTIME
