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
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from receivers import (
    SENDER_AE,
    BenchError,
    clean_env,
    log,
    mr2nst_cli,
    start_mr2nst,
    start_plain,
)

TARGET_RATIO = 0.8
SEND_TIMEOUT_S_PER_IMAGE = 15.0


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
