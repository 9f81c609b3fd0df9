"""The fast student against its teacher on one phantom: ``mr2nst bench --method fast``.

One GE phantom mammogram (2294×1914 by default) is written as DICOM and decoded as the
node decodes it. Then the config's ``fast`` method (the student, with the teacher's
segmentation, reference selection and tone step around it) and its ``mr2nst`` method
(the teacher) each normalize it in a spawned process of their own, so that the peak
memory (``ru_maxrss``, the whole process: Python, torch, the image) is theirs alone. The
first call of each method is a warm-up that builds it and is not timed.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: The issue's targets on this machine's CPU.
TARGETS = {"seconds": 5.0, "peak_mb": 1536.0, "speedup": 100.0}


@dataclass(frozen=True)
class FastBenchSettings:
    """One ``mr2nst bench --method fast`` run."""

    config: str
    size: tuple[int, int] = (2294, 1914)
    repeats: int = 3
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0: torch's default
    teacher: bool = True  # also time the teacher (slow at the paper's settings)


def run_fast_bench(settings: FastBenchSettings) -> dict[str, Any]:
    """Time the student and (once) the teacher on the same phantom.

    Returns:
        The report: ``seconds`` and ``peak_mb`` of the student, ``teacher_seconds``,
        ``speedup`` (their ratio), the machine and the targets.

    Raises:
        ConfigError: the config has no usable ``[fast] checkpoint`` for its teacher.
    """
    from mr2nst.node.config import load_config
    from mr2nst.node.methods.registry import check_fast

    config = load_config(settings.config)
    check_fast(config)  # a missing or mismatched checkpoint stops here, in one line
    with tempfile.TemporaryDirectory(prefix="mr2nst-bench-") as tmp:
        path = _phantom(Path(tmp), settings.size, settings.seed)
        student = _spawned("fast", settings, path, settings.repeats)
        teacher = _spawned("mr2nst", settings, path, 1) if settings.teacher else None
    report: dict[str, Any] = {
        "method": "fast",
        "size": list(settings.size),
        "seconds": student["seconds"],
        "seconds_runs": student["runs"],
        "peak_mb": student["peak_mb"],
        "teacher_seconds": None if teacher is None else teacher["seconds"],
        "teacher_peak_mb": None if teacher is None else teacher["peak_mb"],
        "speedup": None if teacher is None else round(teacher["seconds"] / student["seconds"], 1),
        "student": student["about"],
        "teacher": None if teacher is None else teacher["about"],
        "settings": {**asdict(settings), "size": list(settings.size)},
        "machine": student["machine"],
        "targets": TARGETS,
    }
    report["met"] = {
        "seconds": report["seconds"] <= TARGETS["seconds"],
        "peak_mb": report["peak_mb"] <= TARGETS["peak_mb"],
        "speedup": None if report["speedup"] is None else report["speedup"] >= TARGETS["speedup"],
    }
    return report


def _phantom(folder: Path, size: tuple[int, int], seed: int) -> Path:
    """One GE phantom mammogram as a DICOM file."""
    from mr2nst.node.lab.phantom_io import write_phantom_set

    write_phantom_set(folder, 1, size=size, seed=seed, vendors=("GE",))
    [path] = sorted((folder / "ge").glob("*.dcm"))
    return path


def _spawned(method: str, settings: FastBenchSettings, path: Path, repeats: int) -> dict[str, Any]:
    """:func:`_child` in a fresh spawned process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(_child, method, settings.config, str(path), repeats, settings.threads)
        out: dict[str, Any] = job.result()
    return out


def _child(method: str, config_path: str, path: str, repeats: int, threads: int) -> dict[str, Any]:
    """Build ``method``, warm it up, then time ``repeats`` calls on the image at ``path``."""
    import contextlib
    import resource
    import time

    import torch

    from mr2nst.node.config import load_config
    from mr2nst.node.dicom.pixels import decode
    from mr2nst.node.dicom.scu import read_file
    from mr2nst.node.lab.bench import _machine
    from mr2nst.node.methods.registry import FACTORIES

    if threads > 0:
        torch.set_num_threads(threads)
    config = load_config(config_path)
    built = FACTORIES[method](config)
    decoded = decode(read_file(Path(path)))
    small = decoded.image[:256, :256]  # warm-up: builds caches, loads the bank's images
    with contextlib.suppress(Exception):  # a crop may not segment; the timed runs will tell
        built(small, decoded.info)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        built(decoded.image, decoded.info)
        runs.append(round(time.perf_counter() - started, 3))
    engine = getattr(built, "engine", None)
    return {
        "seconds": statistics.median(runs),
        "runs": runs,
        "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "about": _about(built, engine),
        "machine": _machine(torch.device(getattr(engine, "device", "cpu")), threads),
    }


def _about(method: Any, engine: Any) -> dict[str, Any]:
    """What was timed: the student's architecture, or the teacher's settings."""
    student = getattr(engine, "student", None)
    if student is not None:
        cfg = student.config
        return {
            "parameters": student.parameter_count(),
            "width": cfg.width,
            "depth": cfg.depth,
            "tile": engine.tile,
            "teacher_fingerprint": engine.teacher,
        }
    cfg = engine.config
    return {
        "fingerprint": method.fingerprint(),
        "patch_size": cfg.patch_size,
        "grids": list(cfg.grids),
        "iterations": cfg.iterations,
        "features": engine.weights_id,
    }
