"""``mr2nst status``: is the node running, and how are its lanes, destinations and disk."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mr2nst.node.cli.common import EXIT_OK, EXIT_RUNTIME, config_of, iso_time, print_json
from mr2nst.node.config import Config
from mr2nst.node.errors import LedgerError

if TYPE_CHECKING:
    from mr2nst.node.ledger.stats import LastError, Queue


def add_parser(sub: Any) -> None:
    """Register ``mr2nst status``."""
    p = sub.add_parser(
        "status",
        help="is the node running: uptime, lanes, queues per destination, workers, disk",
    )
    p.add_argument("--config", help="the node's config file (default: built-in defaults)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the node's status; exit 0 when it runs, 1 when it does not (2: bad config)."""
    config = config_of(args)
    report = collect(config, time.time())
    if args.json:
        print_json(report)
    else:
        print(render(report))
    return EXIT_OK if report["running"] else EXIT_RUNTIME


def collect(config: Config, now: float) -> dict[str, Any]:
    """The status as one JSON-ready dict: the node's status file plus the ledger's queues.

    Raises:
        LedgerError: the ledger exists but cannot be opened.
    """
    from mr2nst.node.service.health import read_status, status_path

    data_dir = Path(config.node.data_dir).resolve()
    node = read_status(data_dir)
    if node is None:
        running, reason = False, f"no status file {status_path(data_dir)} (start: mr2nst serve)"
    else:
        running, reason = node.running(now)
    report: dict[str, Any] = {
        "running": running,
        "reason": reason or None,
        "data_dir": str(data_dir),
        "node": None,
        "uptime_s": None,
        "workers": {"alive": None, "configured": config.workers.total},
        "weights": None,
        "disk": _disk(data_dir, config.node.min_free_disk_mb),
    }
    if node is not None:
        report["node"] = {
            "pid": node.pid,
            "host": node.host,
            "version": node.version,
            "ae_title": node.ae_title,
            "port": node.port,
            "metrics": node.metrics or None,
            "started_at": iso_time(node.started_at),
            "updated_at": iso_time(node.updated_at),
            "stopped_at": iso_time(node.stopped_at),
        }
        report["weights"] = node.weights
        if running:
            report["uptime_s"] = round(now - node.started_at, 1)
            report["workers"] = {
                "alive": node.workers_alive,
                "configured": node.workers_configured,
            }
    try:
        report.update(_queues(config, now), ledger_error=None)
    except LedgerError as exc:  # still say what the status file says
        report.update(_queues(config, now, reachable=False), ledger_error=str(exc))
    return report


def _disk(data_dir: Path, min_free_mb: int) -> dict[str, Any]:
    """Free space under ``data_dir`` (of the nearest existing folder above it)."""
    path = data_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    free_mb = shutil.disk_usage(path).free / (1024 * 1024)
    return {"free_mb": round(free_mb, 1), "min_free_mb": min_free_mb, "ok": free_mb >= min_free_mb}


def _queues(config: Config, now: float, reachable: bool = True) -> dict[str, Any]:
    """Lanes, destinations (queue, dead, last error) and state counts from the ledger.

    Raises:
        LedgerError: the ledger exists but cannot be opened.
    """
    from mr2nst.node.ledger import Ledger, stats

    sqlite_file = Path(config.node.data_dir).resolve() / "ledger.db"
    if not reachable or (not config.ledger.url and not sqlite_file.exists()):
        # Never create a ledger just to report on it.
        empty = {lane: {"depth": 0, "oldest_age_s": 0.0} for lane in stats.LANES}
        dests = {name: _destination(stats.Queue(), 0, None, now) for name in config.destinations}
        return {"lanes": empty, "destinations": dests, "counts": {}}
    ledger = Ledger.open(config.ledger_url)
    try:
        counts = ledger.counts()
        with ledger.engine.connect() as conn:
            lanes = stats.lane_queues(conn)
            queues = stats.destination_queues(conn)
            dead = stats.dead_deliveries(conn)
            errors = stats.last_errors(conn)
    finally:
        ledger.close()
    names = sorted(set(config.destinations) | set(queues) | set(dead) | set(errors))
    return {
        "lanes": {
            lane: {"depth": q.depth, "oldest_age_s": round(q.oldest_age_s(now), 1)}
            for lane, q in lanes.items()
        },
        "destinations": {
            name: _destination(
                queues.get(name, stats.Queue()), dead.get(name, 0), errors.get(name), now
            )
            for name in names
        },
        "counts": counts,
    }


def _destination(queue: Queue, dead: int, error: LastError | None, now: float) -> dict[str, Any]:
    """One destination's entry: its queue, dead deliveries and last error."""
    return {
        "depth": queue.depth,
        "oldest_age_s": round(queue.oldest_age_s(now), 1),
        "dead": dead,
        "last_error": None
        if error is None
        else {
            "at": iso_time(error.at),
            "status": None if error.status is None else f"0x{error.status:04X}",
            "outcome": error.outcome,
            "reason": error.reason,
        },
    }


def render(report: dict[str, Any]) -> str:
    """The human-readable status: a summary, then tables of lanes and destinations."""
    node = report["node"]
    if report["running"]:
        state = (
            f"running, pid {node['pid']} on {node['host']}, mr2nst {node['version']}, "
            f"up {duration(report['uptime_s'])} (since {node['started_at']})"
        )
    else:
        state = f"NOT RUNNING: {report['reason']}"
    workers = report["workers"]
    alive = "-" if workers["alive"] is None else workers["alive"]
    disk = report["disk"]
    lines = [
        f"node      {state}",
    ]
    if node is not None:
        metrics = f", metrics on {node['metrics']}" if node["metrics"] else ""
        lines.append(f"dicom     {node['ae_title']} on port {node['port']}{metrics}")
    lines += [
        f"workers   {alive} of {workers['configured']} alive",
        f"weights   {report['weights'] or '-'}",
        f"disk      {disk['free_mb']:.0f} MB free under {report['data_dir']} "
        f"(minimum {disk['min_free_mb']} MB{'' if disk['ok'] else ', BELOW: C-STORE refused'})",
    ]
    if report.get("ledger_error"):
        lines.append(f"ledger    UNREACHABLE: {report['ledger_error']}")
    lines += [
        "",
        f"{'LANE':<12} {'DEPTH':>6}  OLDEST",
    ]
    for lane, q in report["lanes"].items():
        lines.append(f"{lane:<12} {q['depth']:>6}  {_age(q)}")
    lines += ["", f"{'DESTINATION':<16} {'DEPTH':>6}  {'OLDEST':<9} {'DEAD':>5}  LAST ERROR"]
    for name, d in report["destinations"].items():
        error = d["last_error"]
        last = "-"
        if error is not None:
            status = error["status"] or ""
            status = "" if not status or error["reason"].startswith(status) else f" {status}"
            last = f"{error['at']}{status} {error['reason']}".strip()
        lines.append(f"{name:<16} {d['depth']:>6}  {_age(d):<9} {d['dead']:>5}  {last}")
    if not report["destinations"]:
        lines.append("(no destinations)")
    return "\n".join(lines)


def _age(queue: dict[str, Any]) -> str:
    """A queue's oldest age, or ``-`` when it is empty."""
    return duration(queue["oldest_age_s"]) if queue["depth"] else "-"


def duration(seconds: float | None) -> str:
    """``seconds`` in words an admin reads at a glance: ``45s``, ``4m 10s``, ``2h 03m``."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"
