"""``mr2nst send``: C-STORE files or folders to a peer."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mr2nst.node.cli.common import EXIT_OK, EXIT_RUNTIME, add_network_arguments, print_json
from mr2nst.node.errors import UsageError


def add_parser(sub: Any) -> None:
    """Register ``mr2nst send``."""
    p = sub.add_parser("send", help="C-STORE files or folders to a peer")
    add_network_arguments(p)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_send)


def cmd_send(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mr2nst.node.dicom.scu import iter_files, read_file, store_datasets

    files = list(iter_files(args.paths))
    if not files:
        raise UsageError("send: no files found")
    results: list[dict[str, Any]] = []
    batch: list[tuple[str, Any]] = []

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
        if len(batch) >= 16:
            flush()
    if batch:
        flush()
    sent = sum(
        1 for r in results if r["status"] is not None and r["status"] in (0, 0xB000, 0xB006, 0xB007)
    )
    if args.json:
        print_json({"sent": sent, "failed": len(results) - sent, "results": results})
    else:
        for r in results:
            if r["status"] not in (0, 0xB000, 0xB006, 0xB007):
                status = f"0x{r['status']:04X}" if r["status"] is not None else r["error"]
                print(f"FAILED {r['path']}: {status}", file=sys.stderr)
        print(f"sent {sent} of {len(results)} to {args.aec}@{args.host}:{args.port}")
    return EXIT_OK if sent == len(results) else EXIT_RUNTIME
