"""The two receivers the ingest benchmark compares: ``mr2nst serve`` and pynetdicom's storescp.

Each runs as its own process on a free local port; :class:`Receiver` starts it, waits until
it answers C-ECHO, waits until it is idle, and stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

NODE_AE = "MR2NST"
PLAIN_AE = "STORESCP"
SENDER_AE = "BENCH_SCU"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 15.0


class BenchError(RuntimeError):
    """A failed run (receiver did not start, an instance is missing, ...): exit 1."""


def log(message: str) -> None:
    print(f"[ingest] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def echo(port: int, called: str) -> int | None:
    """C-ECHO the receiver; on success return the maximum PDU length it announced (0 = none)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.connection_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        ok = bool(status) and int(status.Status) == 0
        return int(assoc.acceptor.maximum_length or 0) if ok else None
    finally:
        assoc.release()


class Receiver:
    """One receiver subprocess in its own process group (the node spawns workers)."""

    def __init__(
        self, name: str, argv: Sequence[str], port: int, ae_title: str, log_path: Path
    ) -> None:
        self.name, self.port, self.ae_title = name, port, ae_title
        self.log_path = log_path
        self.max_pdu: int | None = None  # as announced in A-ASSOCIATE-AC, once it is up
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=clean_env(),
            )
        except OSError as exc:
            self._log.close()
            raise BenchError(f"cannot start {name}: {exc}") from exc

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before listening; "
                    f"see {self.log_path}:\n{self.tail()}"
                )
            max_pdu = echo(self.port, self.ae_title)
            if max_pdu is not None:
                self.max_pdu = max_pdu
                return
            time.sleep(0.2)
        raise BenchError(
            f"{self.name} did not answer C-ECHO on port {self.port} within {READY_TIMEOUT_S:.0f} s"
        )

    def stop(self) -> None:
        """SIGTERM the main process (graceful, like systemd's KillMode=mixed), then SIGKILL
        whatever is left of its process group (the node's worker processes)."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log(f"{self.name} did not stop in {STOP_TIMEOUT_S:.0f} s; killing it")
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers (workers) of our own group
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self._log.close()

    def settle(self) -> None:
        """Wait until the receiver is idle (start-up work such as worker imports is done)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        before = self.cpu_seconds()
        while before is not None and time.monotonic() < deadline:
            time.sleep(0.25)
            after = self.cpu_seconds()
            if after is None or after - before < 0.01:
                return
            before = after

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds used so far by the receiver and its child processes."""
        try:
            import psutil

            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except Exception:  # noqa: BLE001 - psutil missing or the process is gone: no figure
            return None
        total = 0.0
        for proc in procs:
            with contextlib.suppress(Exception):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def tail(self, chars: int = 2000) -> str:
        self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def clean_env() -> dict[str, str]:
    """The environment without MR2NST_* overrides: the generated config is the whole config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MR2NST_")}


def node_config(path: Path, port: int, data_dir: Path) -> Path:
    """A node with no routes: instances are stored durably and recorded as ``unrouted``."""
    path.write_text(
        "[node]\n"
        f'ae_title = "{NODE_AE}"\n'
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f"data_dir = {json.dumps(str(data_dir))}\n"
        "min_free_disk_mb = 256\n"
        "\n[engine]\nworkers = 1\n"
        '\n[logging]\nformat = "json"\nlevel = "info"\n',
        encoding="utf-8",
    )
    return path


def mr2nst_cli() -> list[str]:
    exe = Path(sys.executable).with_name("mr2nst")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mr2nst.node.cli.main"]


def start_mr2nst(run_dir: Path) -> tuple[Receiver, Path]:
    port = free_port()
    data_dir = run_dir / "data"
    config = node_config(run_dir / "node.toml", port, data_dir)
    receiver = Receiver(
        "mr2nst serve",
        [*mr2nst_cli(), "serve", "--config", str(config)],
        port,
        NODE_AE,
        run_dir / "receiver.log",
    )
    return receiver, config


def start_plain(run_dir: Path) -> tuple[Receiver, Path]:
    port = free_port()
    out = run_dir / "received"
    out.mkdir(parents=True)
    argv = [
        sys.executable,
        "-m",
        "pynetdicom",
        "storescp",
        str(port),
        "-aet",
        PLAIN_AE,
        "-ba",
        "127.0.0.1",
        "-od",
        str(out),
    ]
    return Receiver("pynetdicom storescp", argv, port, PLAIN_AE, run_dir / "receiver.log"), out
