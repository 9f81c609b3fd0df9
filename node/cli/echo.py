"""``mr2nst echo``: C-ECHO a peer."""

from __future__ import annotations

import argparse

from mr2nst.node.cli.common import EXIT_OK, EXIT_RUNTIME, add_network_arguments, print_json


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``mr2nst echo``."""
    p = sub.add_parser("echo", help="C-ECHO a peer")
    add_network_arguments(p)
    p.set_defaults(func=cmd_echo)


def cmd_echo(args: argparse.Namespace) -> int:
    """Run ``mr2nst echo``: exit 0 when the peer answers Success, 1 otherwise."""
    from pynetdicom.status import Status

    from mr2nst.node.dicom.scu import echo
    from mr2nst.node.dicom.status import format_status

    status, error = echo(
        args.host, args.port, calling=args.aet, called=args.aec, timeout_s=args.timeout
    )
    ok = status == Status.SUCCESS
    if args.json:
        print_json({"ok": ok, "status": status, "error": error})
    else:
        print(
            f"C-ECHO {args.aec}@{args.host}:{args.port}: "
            + (f"status {format_status(status)}" if status is not None else error)
        )
    return EXIT_OK if ok else EXIT_RUNTIME
