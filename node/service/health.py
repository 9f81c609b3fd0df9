"""The node's account of itself: the ``/health`` checks and the status file.

``/health`` (on the metrics server) answers whether the node can do its work now: the
ledger answers, the disk is above ``node.min_free_disk_mb``, every worker process is
alive, and the weights of an ``mr2nst`` route were verified at start. The status file
(``<data_dir>/node-status.json``, rewritten atomically every few seconds) tells
``mr2nst status``, a separate process, that the node runs, since when, and how its
workers are.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select

from mr2nst.node.files import atomic_write
from mr2nst.node.ledger import Ledger
from mr2nst.node.ledger.schema import schema_version
from mr2nst.node.service.spool import Spool

STATUS_FILE = "node-status.json"
#: How often the running node rewrites its status file.
STATUS_REFRESH_S = 5.0
#: A status file older than this belongs to a node that stopped or hangs.
STATUS_STALE_S = 30.0


@dataclass(frozen=True)
class Check:
    """One health check's verdict.

    Attributes:
        name: ``ledger``, ``disk``, ``workers`` or ``weights``.
        ok: whether it passed.
        detail: what was found, in words.
    """

    name: str
    ok: bool
    detail: str


class Health:
    """The node's health checks, run on each ``/health`` request (and metrics scrape).

    Args:
        ledger: the node's ledger (reachable: its schema version can be read).
        spool: the node's file areas (free disk under ``data_dir``).
        min_free_mb: ``node.min_free_disk_mb``.
        workers_alive: how many worker processes are alive now.
        workers_configured: ``workers.count`` + ``workers.light``.
        weights: None when no route uses the ``mr2nst`` method, else whether its weights
            were verified when the node started.
    """

    def __init__(
        self,
        ledger: Ledger,
        spool: Spool,
        min_free_mb: float,
        workers_alive: Callable[[], int],
        workers_configured: int,
        weights: bool | None,
    ) -> None:
        self.ledger = ledger
        self.spool = spool
        self.min_free_mb = min_free_mb
        self.workers_alive = workers_alive
        self.workers_configured = workers_configured
        self.weights = weights

    def checks(self) -> list[Check]:
        """Run every check."""
        return [self._ledger(), self._disk(), self._workers(), self.weights_check()]

    def _ledger(self) -> Check:
        try:
            with self.ledger.engine.connect() as conn:
                version = conn.execute(select(func.max(schema_version.c.version))).scalar()
        except Exception as exc:  # edge: any database failure is "unreachable"
            reason = str(exc).splitlines()[0] if str(exc) else ""
            return Check("ledger", False, f"unreachable: {exc.__class__.__name__}: {reason}")
        return Check("ledger", True, f"reachable (schema version {version})")

    def _disk(self) -> Check:
        try:
            free = self.spool.free_mb()
        except OSError as exc:
            return Check("disk", False, f"cannot read free space of {self.spool.root}: {exc}")
        ok = free >= self.min_free_mb
        return Check("disk", ok, f"{free:.0f} MB free, minimum {self.min_free_mb:.0f} MB")

    def _workers(self) -> Check:
        alive = self.workers_alive()
        return Check(
            "workers",
            alive >= self.workers_configured,
            f"{alive} of {self.workers_configured} alive",
        )

    def weights_check(self) -> Check:
        """Whether the weights of an ``mr2nst`` route were verified at start."""
        if self.weights is None:
            return Check("weights", True, "not needed (no route uses the mr2nst method)")
        if self.weights:
            return Check("weights", True, "verified at start")
        return Check("weights", False, "not verified")

    def report(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status (200 when every check passes, else 503) and the JSON body."""
        checks = self.checks()
        ok = all(c.ok for c in checks)
        body = {
            "status": "ok" if ok else "fail",
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
        }
        return (200 if ok else 503), body


@dataclass(frozen=True)
class NodeStatus:
    """What the running node writes to its status file for ``mr2nst status``.

    Attributes:
        pid: the serving process.
        host: the host name it runs on.
        version: mr2nst's version.
        ae_title: the node's AE title.
        port: the DICOM port it listens on.
        metrics: ``host:port`` of the metrics server, or "" when off.
        started_at: when the node started (seconds since the epoch).
        updated_at: when the file was last written.
        workers_alive: worker processes alive at that time.
        workers_configured: ``workers.count`` + ``workers.light``.
        weights: the ``weights`` health check's detail.
        stopped_at: when the node stopped gracefully (None while it runs).
        reloaded_at: when the node last tried to reload its config (None: never).
        reload_ok: whether that reload was applied.
        reload_detail: what it changed, or why it was refused.
    """

    pid: int
    host: str
    version: str
    ae_title: str
    port: int
    metrics: str
    started_at: float
    updated_at: float
    workers_alive: int
    workers_configured: int
    weights: str
    stopped_at: float | None = None
    reloaded_at: float | None = None
    reload_ok: bool | None = None
    reload_detail: str = ""

    def refreshed(self, workers_alive: int, now: float) -> NodeStatus:
        """The same status at ``now`` with ``workers_alive`` workers."""
        return replace(self, workers_alive=workers_alive, updated_at=now)

    def running(self, now: float | None = None) -> tuple[bool, str]:
        """Whether the node that wrote this still runs, and if not, why not (in words)."""
        now = time.time() if now is None else now
        if self.stopped_at is not None:
            return False, f"stopped at {_iso(self.stopped_at)}"
        if self.host == socket.gethostname() and not pid_alive(self.pid):
            return False, f"process {self.pid} is gone (the node was killed or crashed)"
        age = now - self.updated_at
        if age > STATUS_STALE_S:
            return False, (
                f"status file not refreshed for {age:.0f} s (the node hangs or was stopped)"
            )
        return True, ""


def status_path(data_dir: Path) -> Path:
    """Where the node under ``data_dir`` keeps its status file."""
    return Path(data_dir) / STATUS_FILE


def write_status(data_dir: Path, status: NodeStatus) -> None:
    """Atomically replace the status file under ``data_dir``.

    Raises:
        OSError: it cannot be written.
    """
    data = json.dumps(asdict(status), indent=1).encode()

    def writer(fh: BinaryIO) -> None:
        fh.write(data)

    atomic_write(status_path(data_dir), writer)


def read_status(data_dir: Path) -> NodeStatus | None:
    """The status file under ``data_dir``, or None when it is missing or unreadable."""
    try:
        raw = json.loads(status_path(data_dir).read_text())
        return NodeStatus(**raw)
    except (OSError, ValueError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _iso(ts: float) -> str:
    """Seconds since the epoch as ISO 8601 UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
