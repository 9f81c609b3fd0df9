"""C-STORE ingest throughput: ``mr2nst serve`` against pynetdicom's plain ``storescp``.

Both receivers get the same phantom GE mammograms from the same sender (DCMTK
``storescu``, one association per run, all files), in the same run, alternating
mr2nst / plain for ``--repeats`` rounds. A run is timed from the sender's start to its
exit (association request to release). Each run uses a freshly started receiver and an
empty output folder, and starts once the receiver is idle (the node's engine worker
finishes importing well after the SCP answers) and dirty pages are flushed (``sync``), so
neither start-up work nor an earlier run's writeback lands in the timed window.

What is measured on the mr2nst side is the durable receive path alone: the node runs
with no routes, so every instance takes the same path as a routed one up to the
acknowledgement (allowlist, free-disk check, dataset decode, route decision, write to
``spool/tmp`` + fsync + rename into ``spool/in`` + directory fsync, ledger row in
SQLite WAL ``synchronous=FULL``) and is recorded as ``unrouted``, without worker or
forwarder activity competing for the CPU. The plain storescp writes each file with
``Dataset.save_as`` and no fsync.

Prints one JSON object on stdout (also to ``--out``). Exits 0 whether or not the target
is met (it is a benchmark), 1 when an instance is missing or a receiver fails, 2 on bad
arguments.

    python benchmarks/ingest.py                       # 20 x 2294x1914, 3 rounds
    python benchmarks/ingest.py --n 4 --size 512 400 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGET_RATIO = 0.8
NODE_AE = "MR2NST"
PLAIN_AE = "STORESCP"
SENDER_AE = "BENCH_SCU"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 15.0
SEND_TIMEOUT_S_PER_IMAGE = 15.0


class BenchError(RuntimeError):
    """A failed run (receiver did not start, an instance is missing, ...): exit 1."""


# -- inputs ------------------------------------------------------------------------------


def phantom_files(workdir: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    """The ``n`` phantom GE mammograms, generated once per (n, size, seed) and cached."""
    from mr2nst.node.lab.phantom_io import write_phantom_set

    folder = workdir / f"phantoms-{n}x{size[0]}x{size[1]}-s{seed}"
    stamp = folder / "bench-manifest.json"
    if stamp.exists():
        files = [folder / name for name in json.loads(stamp.read_text())["files"]]
        if all(f.is_file() for f in files):
            return files
    shutil.rmtree(folder, ignore_errors=True)
    log(f"generating {n} phantom mammograms {size[0]}x{size[1]} in {folder} ...")
    files = write_phantom_set(folder, n, size=size, seed=seed, vendors=("GE",))
    stamp.write_text(json.dumps({"files": [str(f.relative_to(folder)) for f in files]}))
    return files


def sop_instance_uid(path: Path) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    return str(ds.SOPInstanceUID)


# -- processes ---------------------------------------------------------------------------


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


# -- sending -----------------------------------------------------------------------------


def send(files: Sequence[Path], port: int, called: str) -> float:
    """Send all files on one association with DCMTK storescu; return the wall seconds."""
    argv = [
        "storescu",
        "-aet",
        SENDER_AE,
        "-aec",
        called,
        "-R",
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            timeout=30 + SEND_TIMEOUT_S_PER_IMAGE * len(files),
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(
            f"storescu to {called}:{port} did not finish in {exc.timeout:.0f} s"
        ) from exc
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(
            f"storescu to {called}:{port} exited {done.returncode}:\n"
            f"{done.stdout.decode(errors='replace')[-2000:]}"
        )
    return elapsed


# -- verification ------------------------------------------------------------------------


def verify_mr2nst(config: Path, data_dir: Path, expected: set[str]) -> None:
    out = subprocess.run(
        [
            *mr2nst_cli(),
            "queue",
            "list",
            "--json",
            "--all",
            "--limit",
            "100000",
            "--config",
            str(config),
        ],
        capture_output=True,
        check=False,
        env=clean_env(),
        timeout=120,
    )
    if out.returncode != 0:
        raise BenchError(
            f"mr2nst queue list failed ({out.returncode}): {out.stderr.decode()[-2000:]}"
        )
    items = json.loads(out.stdout)["items"]
    got = {i["sop_instance_uid"] for i in items if i["state"] == "unrouted" and i["spool_path"]}
    missing = expected - got
    files = [Path(i["spool_path"]) for i in items if i["spool_path"]]
    absent = [str(f) for f in files if not f.is_file()]
    if missing or absent or len(items) != len(expected):
        raise BenchError(
            f"mr2nst: {len(missing)} instance(s) missing from the ledger, "
            f"{len(absent)} spool file(s) absent, {len(items)} ledger rows for "
            f"{len(expected)} sent"
        )
    on_disk = len(list((data_dir / "spool" / "in").glob("*.dcm")))
    if on_disk != len(expected):
        raise BenchError(f"mr2nst: {on_disk} files in spool/in, expected {len(expected)}")


def verify_plain(out_dir: Path, expected: set[str]) -> None:
    names = {p.name.split(".", 1)[1] for p in out_dir.iterdir() if "." in p.name}
    missing = expected - names
    if missing:
        raise BenchError(
            f"plain storescp: {len(missing)} of {len(expected)} instance(s) missing in {out_dir}"
        )


# -- one run -----------------------------------------------------------------------------


def run_once(
    kind: str, files: Sequence[Path], expected: set[str], run_dir: Path
) -> tuple[float, float | None, int | None]:
    """One timed send into a fresh receiver.

    Returns (wall seconds, the receiver's CPU seconds during it, its maximum PDU length).
    """
    run_dir.mkdir(parents=True)
    if kind == "mr2nst":
        receiver, config = start_mr2nst(run_dir)
    else:
        receiver, out_dir = start_plain(run_dir)
    try:
        receiver.wait_ready()
        receiver.settle()
        os.sync()  # start every run with no dirty pages of earlier runs pending
        cpu_before = receiver.cpu_seconds()
        try:
            seconds = send(files, receiver.port, receiver.ae_title)
        except BenchError as exc:
            raise BenchError(
                f"{exc}\n--- {receiver.name} log ({receiver.log_path}), last lines:\n"
                f"{receiver.tail()}"
            ) from exc
        cpu_after = receiver.cpu_seconds()
    finally:
        receiver.stop()
    if kind == "mr2nst":
        verify_mr2nst(config, run_dir / "data", expected)
    else:
        verify_plain(out_dir, expected)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return seconds, cpu, receiver.max_pdu


def summary(
    seconds: list[float], cpu: list[float | None], n: int, bytes_total: int
) -> dict[str, Any]:
    median = statistics.median(seconds)
    cpu_known = [c for c in cpu if c is not None]
    return {
        "seconds": [round(s, 3) for s in seconds],
        "median_s": round(median, 3),
        "best_s": round(min(seconds), 3),
        "images_per_s": round(n / median, 3),
        "MB_per_s": round(bytes_total / median / 1e6, 2),
        "receiver_cpu_s": [round(c, 3) for c in cpu_known],
        "receiver_cpu_ms_per_image": (
            round(statistics.median(cpu_known) / n * 1000, 1) if cpu_known else None
        ),
    }


def machine() -> dict[str, Any]:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    import pydicom
    import pynetdicom

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "sender": version(["storescu", "--version"]),
    }


def filesystem(path: Path) -> str:
    try:
        out = subprocess.run(
            ["df", "--output=fstype", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        return out.stdout.split()[-1]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20, help="images per run (default 20)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(2294, 1914))
    p.add_argument("--repeats", type=int, default=3, help="rounds of (mr2nst, plain) (default 3)")
    p.add_argument("--seed", type=int, default=0, help="phantom set seed")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="cache for phantoms and scratch for receivers (default: a temp dir, removed)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep received files and logs under --workdir"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.n < 1 or args.repeats < 1 or min(args.size) < 16:
        p.error("--n and --repeats must be >= 1 and --size at least 16 16")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the JSON. Exit 0 (target met or not), 1 on a failed run."""
    args = parse_args(argv)
    if shutil.which("storescu") is None:
        log(
            "DCMTK storescu is not on PATH (apt-get install dcmtk); "
            "it is the sender for both receivers"
        )
        return 1
    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="mr2nst-bench-")) if own_tmp else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    size = (int(args.size[0]), int(args.size[1]))
    runs_dir = workdir / f"runs-{os.getpid()}"
    try:
        files = phantom_files(workdir, args.n, size, args.seed)
        rounds = run_rounds(args, files, runs_dir)
        result = report(args, size, rounds, workdir)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        if args.keep:
            log(f"kept phantoms, received files and receiver logs under {workdir}")
        elif own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            shutil.rmtree(runs_dir, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    verdict = "meets" if result["meets_target"] else "MISSES"
    log(
        f"mr2nst {result['mr2nst']['images_per_s']} img/s vs plain storescp "
        f"{result['plain_storescp']['images_per_s']} img/s: "
        f"ratio {result['ratio']} {verdict} the target {TARGET_RATIO}"
    )
    return 0


def run_rounds(args: argparse.Namespace, files: list[Path], runs_dir: Path) -> dict[str, Any]:
    """``--repeats`` rounds of (mr2nst, plain); each receiver's summary and the byte total."""
    expected = {sop_instance_uid(f) for f in files}
    bytes_total = sum(f.stat().st_size for f in files)
    times: dict[str, list[float]] = {"mr2nst": [], "plain": []}
    cpus: dict[str, list[float | None]] = {"mr2nst": [], "plain": []}
    max_pdu: dict[str, int | None] = {}
    for rnd in range(args.repeats):
        for kind in ("mr2nst", "plain"):
            seconds, cpu, max_pdu[kind] = run_once(
                kind, files, expected, runs_dir / f"{rnd}-{kind}"
            )
            times[kind].append(seconds)
            cpus[kind].append(cpu)
            log(
                f"round {rnd + 1}/{args.repeats} {kind:<7} {seconds:7.3f} s "
                f"({args.n / seconds:6.2f} img/s, {bytes_total / seconds / 1e6:7.1f} MB/s)"
            )
            if not args.keep:
                shutil.rmtree(runs_dir / f"{rnd}-{kind}", ignore_errors=True)
    node = summary(times["mr2nst"], cpus["mr2nst"], args.n, bytes_total)
    plain = summary(times["plain"], cpus["plain"], args.n, bytes_total)
    node["max_pdu_receive"], plain["max_pdu_receive"] = max_pdu["mr2nst"], max_pdu["plain"]
    return {"mr2nst": node, "plain": plain, "bytes_total": bytes_total}


def report(
    args: argparse.Namespace, size: tuple[int, int], rounds: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    """The JSON result: both receivers' summaries, the ratio and what was measured."""
    node, plain = rounds["mr2nst"], rounds["plain"]
    ratio = node["images_per_s"] / plain["images_per_s"]
    return {
        "benchmark": "ingest",
        "images": args.n,
        "size": list(size),
        "bytes_total": rounds["bytes_total"],
        "repeats": args.repeats,
        "mr2nst": node,
        "plain_storescp": plain,
        "ratio": round(ratio, 3),
        # Less sensitive to bursts of other load than the medians: best run against best run.
        "ratio_of_best_runs": round(plain["best_s"] / node["best_s"], 3),
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "measured": (
            "wall time of one DCMTK storescu association (request to release) sending "
            "every file, per run; fresh receiver and empty output folder per run; "
            "rounds alternate mr2nst / plain"
        ),
        "mr2nst_path": (
            "mr2nst serve with no routes: allowlist, free-disk check, dataset "
            "decode, route decision, fsync+rename into spool/in, directory fsync, "
            "ledger row (state unrouted); 1 idle engine worker and the forwarder run"
        ),
        "plain_path": "python -m pynetdicom storescp -od DIR: Dataset.save_as, no fsync",
        "durable": {"fsync": True, "ledger": "sqlite WAL synchronous=FULL"},
        "transfer_syntax": "Explicit VR Little Endian (uncompressed)",
        "filesystem": filesystem(workdir),
        "machine": machine(),
    }


if __name__ == "__main__":
    sys.exit(main())
