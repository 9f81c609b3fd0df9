"""``mr2nst queue``: list, retry and purge the ledger's jobs."""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mr2nst.node.cli.common import EXIT_OK, config_of, iso_time, print_json
from mr2nst.node.errors import UsageError

if TYPE_CHECKING:
    from mr2nst.node.ledger import Ledger

# Instance and delivery states, as `--state` takes them (mr2nst.node.ledger.states).
STATES = (
    "received",
    "processing",
    "transformed",
    "done",
    "failed",
    "dropped",
    "unrouted",
    "pending",
    "sending",
    "sent",
    "dead",
    "purged",
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?[smhdw])+$")


def add_parser(sub: Any) -> None:
    """Register ``mr2nst queue``."""
    p = sub.add_parser(
        "queue",
        help="inspect and manage the ledger",
        description="list: jobs with their deliveries (newest first); retry: revive dead "
        "deliveries and failed jobs; purge: give them up and delete their files.",
    )
    p.add_argument("action", choices=["list", "retry", "purge"])
    p.add_argument("ids", nargs="*", type=int, help="job ids (retry and purge: these jobs)")
    p.add_argument("--config")
    p.add_argument(
        "--all",
        action="store_true",
        help="list: include settled jobs; retry, purge: every dead delivery and failed job",
    )
    p.add_argument(
        "--state", choices=STATES, help="list: jobs in this state or with a delivery in it"
    )
    p.add_argument("--destination", help="list: jobs bound for this destination")
    p.add_argument("--study", metavar="UID", help="list: jobs of this StudyInstanceUID")
    p.add_argument(
        "--since",
        metavar="WHEN",
        help="list: jobs received since an ISO date/time (UTC unless it says) "
        "or for a duration like 2h, 30m, 1d",
    )
    p.add_argument("--history", action="store_true", help="list: each job's attempt history")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_queue)


def parse_since(value: str, now: float) -> float:
    """``--since`` as seconds since the epoch: an ISO date/time or a duration back from now.

    Raises:
        UsageError: neither (exit 2, one line).
    """
    text = value.strip().lower()
    if _DURATION.match(text):
        seconds = sum(
            float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text)
        )
        return now - seconds
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise UsageError(
            f"queue: --since {value!r}: not an ISO date/time (2025-01-31, "
            "2025-01-31T08:00) or a duration (2h, 30m, 1d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # the times queue list shows are UTC
    return when.timestamp()


def cmd_queue(args: argparse.Namespace) -> int:
    """List the ledger's work, revive dead work (``retry``) or drop it and its files (``purge``).

    Raises:
        UsageError: a bad ``--since``, or ``retry`` or ``purge`` without ids or ``--all``.
    """
    from mr2nst.node.ledger import Ledger

    since = None if args.since is None else parse_since(args.since, time.time())
    if args.action == "purge" and not args.ids and not args.all:
        raise UsageError(
            "queue purge: name the job ids to purge, or give --all to purge every dead "
            "delivery and failed job"
        )
    if args.action == "retry" and not args.ids and not args.all:
        raise UsageError(
            "queue retry: name the job ids to retry, or give --all to retry every dead "
            "delivery and failed job (permanent rejections included)"
        )
    config = config_of(args)
    ledger = Ledger.open(config.ledger_url)
    try:
        if args.action == "list":
            rows = ledger.queue(
                include_done=args.all,
                limit=args.limit,
                states=(args.state,) if args.state else (),
                destination=args.destination,
                study=args.study,
                since=since,
            )
            counts = ledger.counts()
            if args.json:
                print_json({"counts": counts, "items": rows})
            else:
                print(render(rows, counts, args.history))
        elif args.action == "retry":
            n = ledger.retry(args.ids)
            print_json({"revived": n}) if args.json else print(f"revived {n} item(s)")
        else:
            _purge(ledger, args, config.node.data_dir)
    finally:
        ledger.close()
    return EXIT_OK


def _purge(ledger: Ledger, args: argparse.Namespace, data_dir: Path) -> None:
    """Give up dead deliveries and failed jobs (the ids, or all) and remove their files."""
    from mr2nst.node.service.forwarder import remove_files
    from mr2nst.node.service.spool import Spool

    rows = ledger.purge(args.ids)
    removed = remove_files(rows, Spool(data_dir))
    ledger.forget_paths([r["id"] for r in rows])
    if args.json:
        print_json({"purged": len(rows), "files_removed": removed})
    else:
        print(f"purged {len(rows)} instance(s), removed {removed} file(s)")


_HEADER = (
    f"{'ID':>6}  {'STATE':<11} {'LANE':<8} {'ROUTE':<16} {'RECEIVED':<25} {'DELIVERIES':<24} REASON"
)


def render(rows: list[dict[str, Any]], counts: dict[str, int], history: bool) -> str:
    """The human-readable list: a header, one line per job, its history under it."""
    lines = [_HEADER]
    for r in rows:
        dels = " ".join(
            f"{d['destination']}={d['state']}({d['attempts']})" for d in r["deliveries"]
        )
        reasons = [f"fallback: {r['fallback_reason']}"] if r.get("fallback_reason") else []
        reasons += [r["error"]] if r["error"] else []
        reasons += [
            f"{d['destination']}: {d['error']}"
            for d in r["deliveries"]
            if d["error"] and d["state"] != "sent"
        ]
        reason = "; ".join(reasons)
        lines.append(
            f"{r['id']:>6}  {r['state']:<11} {r.get('lane') or '-':<8} "
            f"{r['route'] or '-':<16} {iso_time(r['received_at']) or '-':<25} "
            f"{dels or '-':<24} {reason}".rstrip()
        )
        if history:
            lines.extend(_history_line(h) for h in r["history"])
    if not rows:
        lines.append("(no jobs)")
    lines.append("counts: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"))
    return "\n".join(lines)


def _history_line(h: dict[str, Any]) -> str:
    """One attempt, indented under its job: time, stage, destination, status, outcome, why."""
    status = "-" if h["status"] is None else f"0x{h['status']:04X}"
    took = "" if h.get("seconds") is None else f" ({h['seconds']:.1f}s)"
    return (
        f"{'':>8}{iso_time(h['at'])}  {h['stage']:<9} {h['destination'] or '-':<16} "
        f"{status:<6} {h['outcome'] + took:<20} {h['reason'] or ''}".rstrip()
    )
