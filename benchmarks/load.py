"""Load: concurrent associations into ``mr2nst serve`` with a passthrough route to a DCMTK sink.

``--senders`` DCMTK ``storescu`` processes run in parallel, one association each, each
sending ``--n`` distinct phantom GE mammograms (written once with the project's phantom
writer, as ``ingest.py`` does) to ``mr2nst serve``. The node's one route is a
``normalize`` route with method ``passthrough`` (pixels unchanged, through the full
decode / derive / encode path) whose destination is a DCMTK ``storescp`` sink started by
this script. Free local ports and temporary folders throughout.

Reported (one JSON object on stdout, also to ``--out``):

- throughput over the whole run: from the start of the first sender to the last instance
  written at the sink (the newest file modification time there), in instances/s and
  MB/s (bytes sent);
- receive -> forwarded latency per instance, p50/p95/p99: from the node's JSON log, the
  time of the ``stage_receive`` event (logged when the instance is acknowledged) to the
  time of the ``stage_forward`` event with ``outcome = "sent"``, matched by ``sop_uid``
  (the received instance's UID, which both events carry);
- refusals: ``stage_receive`` events with ``outcome = "refused"`` plus ``storescu``
  processes that failed (goal 0);
- peak RSS of the node's process tree (main process, workers; psutil, sampled every
  0.2 s), and machine information.

Exits 0 whether or not a goal is met (it is a benchmark), 1 when an instance is missing
at the sink or a process fails, 2 on bad arguments.

    python benchmarks/load.py                               # 4 x 50 x 2294x1914
    python benchmarks/load.py --n 10 --size 1024 832        # quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ingest import filesystem, machine, phantom_files, sop_instance_uid
from receivers import (
    NODE_AE,
    SENDER_AE,
    BenchError,
    Receiver,
    clean_env,
    free_port,
    log,
    mr2nst_cli,
)

SINK_AE = "SINK"
RSS_SAMPLE_S = 0.2
SEND_TIMEOUT_S_PER_IMAGE = 30.0
DRAIN_TIMEOUT_S_PER_IMAGE = 10.0


# -- processes ---------------------------------------------------------------------------


def node_config(path: Path, port: int, data_dir: Path, sink_port: int, workers: Sequence[int]):
    """The node: one normalize/passthrough route to the sink."""
    path.write_text(
        "[node]\n"
        f'ae_title = "{NODE_AE}"\n'
        'host = "127.0.0.1"\n'
        f"port = {port}\n"
        f"data_dir = {json.dumps(str(data_dir))}\n"
        "min_free_disk_mb = 256\n"
        f"\n[workers]\ncount = {workers[0]}\nlight = {workers[1]}\n"
        "\n[[routes]]\n"
        'name = "load"\n'
        'action = "normalize"\n'
        'method = "passthrough"\n'
        'destinations = ["sink"]\n'
        "\n[destinations.sink]\n"
        f'ae_title = "{SINK_AE}"\n'
        'host = "127.0.0.1"\n'
        f"port = {sink_port}\n"
        '\n[logging]\nformat = "json"\nlevel = "info"\n',
        encoding="utf-8",
    )
    return path


def start_sink(run_dir: Path) -> tuple[Receiver, Path]:
    """DCMTK storescp, one forked child per association, files named by SOP Instance UID."""
    port = free_port()
    out = run_dir / "sink"
    out.mkdir(parents=True)
    argv = ["storescp", "--fork", "-aet", SINK_AE, "-od", str(out), "-uf", str(port)]
    return Receiver("dcmtk storescp (sink)", argv, port, SINK_AE, run_dir / "sink.log"), out


class RssSampler(threading.Thread):
    """Peak summed RSS of a process and its descendants, sampled every RSS_SAMPLE_S."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._stop_event.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self.samples += 1
            self._stop_event.wait(RSS_SAMPLE_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


# -- sending -----------------------------------------------------------------------------


def start_sender(files: Sequence[Path], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    argv = ["storescu", "-aet", SENDER_AE, "-aec", NODE_AE, "127.0.0.1", str(port)]
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            [*argv, *map(str, files)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=clean_env(),
        )


def wait_for_sink(sink_dir: Path, expected: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    count = 0
    while time.monotonic() < deadline:
        count = sum(1 for p in sink_dir.iterdir() if p.is_file())
        if count >= expected:
            time.sleep(0.5)  # the last file's final write
            return count
        time.sleep(0.2)
    return count


# -- the node's log ----------------------------------------------------------------------


def log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def latencies(events: Sequence[dict[str, Any]]) -> tuple[list[float], int]:
    """Seconds from stage_receive (stored) to stage_forward (sent) per sop_uid; refusals."""
    received: dict[str, datetime] = {}
    sent: dict[str, datetime] = {}
    refused = 0
    for e in events:
        uid, when = e.get("sop_uid"), e.get("timestamp")
        if e.get("event") == "stage_receive" and e.get("outcome") == "refused":
            refused += 1
        if not uid or not when:
            continue
        if e.get("event") == "stage_receive" and e.get("outcome") == "stored":
            received[uid] = datetime.fromisoformat(when)
        elif e.get("event") == "stage_forward" and e.get("outcome") == "sent":
            sent.setdefault(uid, datetime.fromisoformat(when))
    out = [(sent[u] - received[u]).total_seconds() for u in received if u in sent]
    return sorted(out), refused


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return round(sorted_values[0], 3)
    cuts = statistics.quantiles(sorted_values, n=100, method="inclusive")
    return round(cuts[int(q) - 1], 3)


# -- one run -----------------------------------------------------------------------------


def run(args: argparse.Namespace, files: list[Path], run_dir: Path) -> dict[str, Any]:
    total = args.senders * args.n
    batches = [files[i * args.n : (i + 1) * args.n] for i in range(args.senders)]
    expected = {sop_instance_uid(f) for f in files}
    if len(expected) != total:
        raise BenchError(f"{len(expected)} distinct SOP Instance UIDs for {total} files")
    bytes_total = sum(f.stat().st_size for f in files)
    sink, sink_dir = start_sink(run_dir)
    node = None
    sampler = None
    try:
        sink.wait_ready()
        port = free_port()
        config = node_config(run_dir / "node.toml", port, run_dir / "data", sink.port, args.workers)
        node = Receiver(
            "mr2nst serve",
            [*mr2nst_cli(), "serve", "--config", str(config)],
            port,
            NODE_AE,
            run_dir / "node.log",
        )
        node.wait_ready()
        node.settle()
        sampler = RssSampler(node.proc.pid)
        sampler.start()
        started_wall = time.time()
        senders = [
            start_sender(batch, port, run_dir / f"storescu-{i}.log")
            for i, batch in enumerate(batches)
        ]
        failed_senders = 0
        for i, proc in enumerate(senders):
            try:
                rc = proc.wait(timeout=60 + SEND_TIMEOUT_S_PER_IMAGE * total)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = -1
            if rc != 0:
                failed_senders += 1
                log(f"storescu {i} exited {rc}; see {run_dir / f'storescu-{i}.log'}")
        sent_s = time.time() - started_wall
        got = wait_for_sink(sink_dir, total, 60 + DRAIN_TIMEOUT_S_PER_IMAGE * total)
        sink_files = [p for p in sink_dir.iterdir() if p.is_file()]
        last = max((p.stat().st_mtime for p in sink_files), default=time.time())
    finally:
        if sampler is not None:
            sampler.stop()
        if node is not None:
            node.stop()
        sink.stop()
    if got < total:
        raise BenchError(
            f"{got} of {total} instances arrived at the sink; see {run_dir / 'node.log'}"
        )
    lat, refused = latencies(log_events(run_dir / "node.log"))
    seconds = last - started_wall
    return {
        "instances": total,
        "bytes_total": bytes_total,
        "seconds": round(seconds, 3),
        "senders_done_s": round(sent_s, 3),
        "instances_per_s": round(total / seconds, 3),
        "MB_per_s": round(bytes_total / seconds / 1e6, 2),
        "latency_s": {
            "measured": len(lat),
            "p50": percentile(lat, 50),
            "p95": percentile(lat, 95),
            "p99": percentile(lat, 99),
            "max": round(lat[-1], 3) if lat else None,
        },
        "refusals": refused + failed_senders,
        "refused_c_store": refused,
        "failed_senders": failed_senders,
        "peak_rss_MB": round(sampler.peak / 1e6, 1) if sampler is not None else None,
        "rss_samples": sampler.samples if sampler is not None else 0,
        "at_sink": got,
    }


# -- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50, help="instances per sender (default 50)")
    p.add_argument("--senders", type=int, default=4, help="parallel associations (default 4)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(2294, 1914))
    p.add_argument(
        "--workers",
        type=int,
        nargs=2,
        metavar=("COUNT", "LIGHT"),
        default=(1, 1),
        help="workers.count and workers.light of the node (default 1 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="phantom set seed")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="cache for phantoms and scratch (default: a temp dir, removed)",
    )
    p.add_argument("--keep", action="store_true", help="keep logs and files under --workdir")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.n < 1 or args.senders < 1 or min(args.size) < 16:
        p.error("--n and --senders must be >= 1 and --size at least 16 16")
    if args.workers[0] < 0 or args.workers[1] < 0 or sum(args.workers) < 1:
        p.error("--workers COUNT LIGHT: non-negative, at least one worker")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            log(f"DCMTK {tool} is not on PATH (apt-get install dcmtk)")
            return 1
    own_tmp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="mr2nst-load-")) if own_tmp else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    size = (int(args.size[0]), int(args.size[1]))
    run_dir = workdir / f"load-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True)
    try:
        files = phantom_files(workdir, args.senders * args.n, size, args.seed)
        figures = run(args, files, run_dir)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        if args.keep:
            log(f"kept phantoms, logs and sink files under {workdir}")
        elif own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    result = {
        "benchmark": "load",
        "senders": args.senders,
        "per_sender": args.n,
        "size": list(size),
        "workers": {"count": args.workers[0], "light": args.workers[1]},
        **figures,
        "goal_refusals": 0,
        "meets_goal": figures["refusals"] == 0,
        "route": "normalize, method passthrough, to a DCMTK storescp --fork sink",
        "measured": (
            "throughput: first storescu start to the newest file mtime at the sink; "
            "latency: node JSON log, stage_receive (stored) to stage_forward (sent) "
            "per sop_uid; peak RSS: node process tree, psutil every 0.2 s"
        ),
        "transfer_syntax": "Explicit VR Little Endian (uncompressed)",
        "filesystem": filesystem(workdir),
        "machine": machine(),
    }
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
