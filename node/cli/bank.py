"""``mr2nst bank``: manage the reference bank of target-domain (UIH) images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mr2nst.node.cli.common import EXIT_OK, EXIT_RUNTIME, print_json
from mr2nst.node.config import load_config
from mr2nst.node.errors import UsageError

if TYPE_CHECKING:
    from mr2nst.bank.bank import Bank


def add_parser(sub: Any) -> None:
    """Register ``mr2nst bank``."""
    p = sub.add_parser("bank", help="manage the reference bank of target-domain (UIH) images")
    p.add_argument("action", choices=["add", "list", "remove", "verify"])
    p.add_argument(
        "items",
        nargs="*",
        metavar="PATH|UID",
        help="add: files or folders; remove: a SOP Instance UID",
    )
    p.add_argument("--bank", help="bank directory (default: bank.path of --config)")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bank)


def cmd_bank(args: argparse.Namespace) -> int:
    """Add, list, remove or verify references of the bank at ``--bank`` (or ``bank.path``).

    Returns:
        0, or 1 when ``add`` rejected a file or ``verify`` found a problem.

    Raises:
        UsageError: ``add`` without paths, or ``remove`` without exactly one UID.
    """
    from mr2nst.bank.bank import Bank

    root = Path(args.bank) if args.bank else load_config(args.config).bank.path
    bank = Bank(root)
    actions = {"add": _add, "list": _list, "remove": _remove, "verify": _verify}
    return actions[args.action](args, bank, root)


def _add(args: argparse.Namespace, bank: Bank, root: Path) -> int:
    from tqdm import tqdm

    from mr2nst.bank.bank import iter_files

    if not args.items:
        raise UsageError("bank add: give files or folders to add")
    total = len(iter_files(args.items))
    with tqdm(total=total, desc="bank add", unit="file", disable=not sys.stderr.isatty()) as bar:
        report = bank.add(args.items, progress=lambda _p: bar.update())
    if args.json:
        print_json(
            {
                "added": [e.sop_instance_uid for e in report.added],
                "already": report.already,
                "rejected": [{"file": f, "reason": r} for f, r in report.rejected],
            }
        )
    else:
        for file, reason in report.rejected:
            print(f"rejected {file}: {reason}", file=sys.stderr)
        print(
            f"added {len(report.added)}, already in the bank {len(report.already)}, "
            f"rejected {len(report.rejected)} ({root}: {len(bank.entries())} references)"
        )
    return EXIT_OK if not report.rejected else EXIT_RUNTIME


def _list(args: argparse.Namespace, bank: Bank, root: Path) -> int:
    entries = bank.entries()
    if args.json:
        print_json([{k: v for k, v in e.to_json().items() if k != "histogram"} for e in entries])
        return EXIT_OK
    for e in entries:
        print(
            f"{e.sop_instance_uid}  {e.view:<3} {e.laterality}  "
            f"{e.breast_area_mm2:>9.0f} mm2  "
            f"{e.bits_stored} bit {e.photometric:<11} {e.manufacturer} {e.model}".rstrip()
        )
    print(f"{len(entries)} references in {root}")
    return EXIT_OK


def _remove(args: argparse.Namespace, bank: Bank, root: Path) -> int:
    if len(args.items) != 1:
        raise UsageError("bank remove: give exactly one SOP Instance UID")
    entry = bank.remove(args.items[0])
    if args.json:
        print_json({"removed": entry.sop_instance_uid})
    else:
        print(f"removed {entry.sop_instance_uid}")
    return EXIT_OK


def _verify(args: argparse.Namespace, bank: Bank, root: Path) -> int:
    problems = bank.verify()
    if args.json:
        print_json({"references": len(bank.entries()), "problems": problems})
    else:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(bank.entries())} references, {len(problems)} problem(s)")
    return EXIT_OK if not problems else EXIT_RUNTIME
