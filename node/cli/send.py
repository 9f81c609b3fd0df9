"""``mr2nst send``: C-STORE files or folders to a peer."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TypedDict

from mr2nst.node.cli.common import EXIT_OK, EXIT_RUNTIME, add_network_arguments, print_json
from mr2nst.node.errors import UsageError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Files sent per association.
BATCH = 16


class SendRow(TypedDict):
    """The outcome for one file: the peer's status, or None and the reason."""

    path: str
    status: int | None
    error: str


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``mr2nst send``."""
    p = sub.add_parser("send", help="C-STORE files or folders to a peer")
    add_network_arguments(p)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_send)


def delivered(row: SendRow) -> bool:
    """Whether the peer holds the file's instance (success, warning or duplicate).

    The same classification as the forwarder's (:mod:`mr2nst.node.dicom.status`).
    """
    from mr2nst.node.dicom.status import classify_store_response

    return row["status"] is not None and classify_store_response(row["status"]).delivered


def send_files(args: argparse.Namespace) -> list[SendRow]:
    """Send every file named by ``args.paths``, ``BATCH`` per association.

    Raises:
        UsageError: no file was found.
    """
    from tqdm import tqdm

    from mr2nst.node.dicom.scu import iter_files, read_file, store_datasets

    files = list(iter_files(args.paths))
    if not files:
        raise UsageError("send: no files found")
    results: list[SendRow] = []
    batch: list[tuple[str, Dataset]] = []

    def flush() -> None:
        for out in store_datasets(
            batch, args.host, args.port, calling=args.aet, called=args.aec, timeout_s=args.timeout
        ):
            results.append({"path": out.path, "status": out.status, "error": out.error})
        batch.clear()

    for path in tqdm(files, desc="send", unit="file", disable=not sys.stderr.isatty()):
        try:
            batch.append((str(path), read_file(path)))
        except ValueError as exc:
            results.append({"path": str(path), "status": None, "error": str(exc)})
        if len(batch) >= BATCH:
            flush()
    if batch:
        flush()
    return results


def cmd_send(args: argparse.Namespace) -> int:
    """Run ``mr2nst send``: exit 0 when every file was delivered, 1 otherwise."""
    from mr2nst.node.dicom.status import format_status

    results = send_files(args)
    sent = sum(1 for r in results if delivered(r))
    if args.json:
        print_json({"sent": sent, "failed": len(results) - sent, "results": results})
    else:
        for r in results:
            if not delivered(r):
                status = format_status(r["status"]) if r["status"] is not None else r["error"]
                print(f"FAILED {r['path']}: {status}", file=sys.stderr)
        print(f"sent {sent} of {len(results)} to {args.aec}@{args.host}:{args.port}")
    return EXIT_OK if sent == len(results) else EXIT_RUNTIME
