"""``mr2nst ledger rebuild``: re-register files that the ledger lost track of."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mr2nst.node.cli.common import EXIT_OK, config_of, print_json
from mr2nst.node.errors import NodeError


class NodeRunningError(NodeError):
    """The node that owns the data directory is running; the ledger is not rebuilt."""


def add_parser(sub: Any) -> None:
    """Register ``mr2nst ledger``."""
    p = sub.add_parser("ledger", help="repair the ledger (rebuild lost rows from the spool)")
    actions = p.add_subparsers(dest="action", required=True)
    rebuild = actions.add_parser(
        "rebuild",
        help="re-register spool/in and outbox/ files that have no ledger row "
        "(after the ledger was lost); run while the node is stopped",
    )
    rebuild.add_argument("--config", required=True)
    rebuild.add_argument("--json", action="store_true", help="print what was done as JSON")
    rebuild.set_defaults(func=cmd_rebuild)


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Re-register orphaned files; print what was registered and what was left.

    Raises:
        NodeRunningError: the node that owns ``data_dir`` is running.
        LedgerError: the ledger cannot be opened.
    """
    from mr2nst.node.ledger import Ledger
    from mr2nst.node.ledger.reconcile import rebuild
    from mr2nst.node.service.health import read_status
    from mr2nst.node.service.routing import Router
    from mr2nst.node.service.spool import Spool

    config = config_of(args)
    data_dir = Path(config.node.data_dir).resolve()
    status = read_status(data_dir)
    if status is not None and status.running()[0]:
        raise NodeRunningError(
            f"the node is running (pid {status.pid} on {status.host}); stop it, then run "
            "mr2nst ledger rebuild again"
        )
    spool = Spool(data_dir)
    ledger = Ledger.open(config.ledger_url)
    try:
        report = rebuild(
            ledger,
            spool.incoming,
            spool.outbox,
            Router(config.routes).decide,
            config.node.ae_title,
        )
    finally:
        ledger.close()
    if args.json:
        print_json(report.as_dict())
        return EXIT_OK
    for item in report.registered:
        print(
            f"registered {item['path']} as job {item['job_id']} ({item['kind']}, "
            f"route {item['route']}, {item['action']})"
        )
    for item in report.left:
        print(f"left {item['path']}: {item['reason']}")
    print(f"{len(report.registered)} file(s) registered, {len(report.left)} left in place")
    if report.left:
        print(
            "the files left in place keep the node from starting: fix their routes and run "
            "this again, or move them out of spool/in and outbox/ (e.g. to dead/)"
        )
    return EXIT_OK
