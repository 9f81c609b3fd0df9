"""``mr2nst queue``: list, retry and purge the ledger's jobs."""

from __future__ import annotations

import argparse
from typing import Any

from mr2nst.node.cli.common import EXIT_OK, config_of, iso_time, print_json


def add_parser(sub: Any) -> None:
    """Register ``mr2nst queue``."""
    p = sub.add_parser("queue", help="inspect and manage the ledger")
    p.add_argument("action", choices=["list", "retry", "purge"])
    p.add_argument("ids", nargs="*", type=int, help="job ids (default: all)")
    p.add_argument("--config")
    p.add_argument("--all", action="store_true", help="list: include finished instances")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue)


def cmd_queue(args: argparse.Namespace) -> int:
    """List the ledger's work, revive dead work (``retry``) or drop it and its files (``purge``)."""
    from mr2nst.node.ledger import Ledger
    from mr2nst.node.service.forwarder import remove_files
    from mr2nst.node.service.spool import Spool

    config = config_of(args)
    ledger = Ledger.open(config.ledger_url)
    try:
        if args.action == "list":
            rows = ledger.queue(include_done=args.all, limit=args.limit)
            if args.json:
                print_json({"counts": ledger.counts(), "items": rows})
                return EXIT_OK
            for r in rows:
                dels = " ".join(
                    f"{d['destination']}={d['state']}({d['attempts']})" for d in r["deliveries"]
                )
                print(
                    f"{r['id']:>6} {r['state']:<11} {r['action']:<9} {r['route'] or '-':<12} "
                    f"{iso_time(r['received_at'])} {dels} {r['error'] or ''}".rstrip()
                )
            print("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(ledger.counts().items())))
        elif args.action == "retry":
            n = ledger.retry(args.ids)
            print_json({"revived": n}) if args.json else print(f"revived {n} item(s)")
        else:  # purge
            rows = ledger.purge(args.ids)
            removed = remove_files(rows, Spool(config.node.data_dir))
            ledger.forget_paths([r["id"] for r in rows])
            print_json({"purged": len(rows), "files_removed": removed}) if args.json else print(
                f"purged {len(rows)} instance(s), removed {removed} file(s)"
            )
    finally:
        ledger.close()
    return EXIT_OK
