"""Train the fast student on a site's own images: the work of ``mr2nst train-fast``.

1. The teacher is the ``mr2nst`` method this config defines (engine, weights, refiner,
   bank, references). It runs on every source image; its output (the engine's [0, 1]
   image, before the tone step), the image it started from and the breast mask are cached
   per source under the teacher's fingerprint, so a rerun or ``--resume`` computes only
   what is missing, and a changed teacher never reuses another's outputs.
2. The student (:mod:`mr2nst.core.fast`) is trained on random native-resolution crops
   (:mod:`mr2nst.core.lab.student_train`).
3. After every epoch the checkpoint is written atomically: the student, its
   architecture, the teacher's fingerprint and the training summary, plus the state that
   ``--resume`` continues from.

Progress: bars on a terminal, otherwise one JSON object per line on stdout.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from mr2nst.node.errors import UsageError
from mr2nst.node.files import atomic_write


@dataclass(frozen=True)
class FastTrainingSettings:
    """One ``mr2nst train-fast`` run: its command-line options."""

    source: str
    config: str
    out: Path
    epochs: int | None = None  # None: the training settings' default
    resume: bool = False
    teacher_cache: Path | None = None  # None: OUT.parent/fast-teacher-cache
    width: int = 16
    depth: int = 2
    crop: int = 96
    batch: int = 8
    crops_per_image: int = 16
    lr: float = 2e-3
    detail_weight: float = 16.0  # the tuning set (s8): µC CNR 0.792 vs 0.785 at 4
    seed: int = 0
    progress: bool = False  # bars on stderr (a terminal); JSON lines otherwise

    @property
    def cache_dir(self) -> Path:
        """The teacher cache: ``teacher_cache``, or ``OUT.parent/fast-teacher-cache``."""
        if self.teacher_cache is not None:
            return self.teacher_cache
        return self.out.parent / "fast-teacher-cache"


@dataclass
class Teacher:
    """The teacher method and what identifies it."""

    method: Any  # Mr2nstMethod
    fingerprint: str
    description: dict[str, Any] = field(default_factory=dict)


def _usage(message: str) -> UsageError:
    return UsageError(f"train-fast: {message}")


def train_fast(settings: FastTrainingSettings, config: Any = None) -> dict[str, Any]:
    """Train a student as ``mr2nst train-fast`` does.

    Args:
        settings: the run's options.
        config: the teacher's :class:`~mr2nst.node.config.Config`, when the caller has
            it already (the demo); None loads ``settings.config``.

    Returns:
        The checkpoint's training summary.

    Raises:
        UsageError: an input, setting or saved state that does not fit (exit 2, one line).
        ConfigError: the node config is invalid.
        WeightsError: the teacher's feature weights are missing or corrupt.
    """
    from mr2nst.core.fast import StudentConfig
    from mr2nst.core.lab.student_train import StudentTrainSettings, TrainingState
    from mr2nst.node.config import load_config

    if config is None:
        if not Path(settings.config).is_file():
            raise _usage(f"--config {settings.config}: no such file (the teacher's config)")
        config = load_config(settings.config)
    sources = _sources(settings.source)
    defaults = StudentTrainSettings()
    try:
        train = StudentTrainSettings(
            epochs=settings.epochs or defaults.epochs,
            crops_per_image=settings.crops_per_image,
            crop=settings.crop,
            batch=settings.batch,
            lr=settings.lr,
            seed=settings.seed,
            detail_weight=settings.detail_weight,
        )
        student_config = StudentConfig(width=settings.width, depth=settings.depth)
    except ValueError as exc:  # EngineConfigError is a ValueError too
        raise _usage(str(exc)) from None
    teacher = _teacher(config)
    # The student's output takes the engine's detail mode, as the teacher's did.
    train = replace(train, detail_sigma=teacher.method.engine.config.detail_sigma)
    state = None
    student = _seeded_student(student_config, settings.seed)
    if settings.resume:
        student, state = _resumed(settings, teacher, student_config)
    elif settings.out.exists():
        raise _usage(f"{settings.out} exists: pass --resume to continue, or delete it")
    emit = _emitter(settings.progress)
    pairs, teacher_seconds = _teacher_outputs(settings, teacher, sources, student, emit)
    summary = {
        "sources": len(sources),
        "source_dir": str(settings.source),
        "shapes": sorted({f"{p.target.shape[0]}x{p.target.shape[1]}" for p in pairs}),
        "settings": train.as_dict(),
        "teacher_seconds": round(teacher_seconds, 1),
        "parameters": student.parameter_count(),
    }

    def on_epoch(report: Any, saved: TrainingState) -> None:
        summary.update(epochs=saved.epoch, losses=saved.losses, seconds=round(saved.seconds, 1))
        _save(settings.out, student, teacher, summary, saved)
        emit(
            {
                "event": "epoch",
                "epoch": report.epoch,
                "epochs": report.epochs,
                "seconds": round(report.seconds, 2),
                **{k: round(v, 5) for k, v in report.losses.items()},
            }
        )

    from mr2nst.core.lab.student_train import train_student

    if state is not None and state.epoch >= train.epochs:
        raise _usage(f"{settings.out} already has {state.epoch} epochs; raise --epochs")
    train_student(student, pairs, train, state or TrainingState(), on_epoch)
    emit({"event": "done", "out": str(settings.out), "epochs": train.epochs})
    return summary


# -- inputs ----------------------------------------------------------------------------


def _sources(folder: str) -> list[Path]:
    """Every DICOM file under ``folder`` (one clear line when there is none)."""
    from mr2nst.node.dicom.scu import iter_files

    root = Path(folder)
    if not root.is_dir():
        raise _usage(f"--source {folder}: not a directory")
    files = list(iter_files([str(root)]))
    if not files:
        raise _usage(f"--source {folder}: no DICOM files")
    return files


def _teacher(config: Any) -> Teacher:
    """The config's ``mr2nst`` method, with its fingerprint (the bank must have references)."""
    from mr2nst.bank.bank import Bank
    from mr2nst.node.methods.fast import teacher_fingerprint
    from mr2nst.node.methods.registry import FACTORIES

    if not Bank(config.bank.path).entries():
        raise _usage(
            f"bank {config.bank.path} has no references (add UIH images with `mr2nst bank add`)"
        )
    method = FACTORIES["mr2nst"](config)
    fingerprint = teacher_fingerprint(method)  # type: ignore[arg-type]
    engine = method.engine  # type: ignore[attr-defined]
    description = {
        "fingerprint": fingerprint,
        "engine": engine.fingerprint(),
        "features": engine.weights_id,
        "refiner": method.refiner_name or "untrained",  # type: ignore[attr-defined]
        "references": method.references,  # type: ignore[attr-defined]
        "bank": method.bank_id(),  # type: ignore[attr-defined]
        "settings": {
            "patch_size": engine.config.patch_size,
            "grids": list(engine.config.grids),
            "iterations": engine.config.iterations,
            "init": engine.config.init,
            "tone": engine.config.tone,
        },
    }
    return Teacher(method, fingerprint, description)


def _seeded_student(config: Any, seed: int) -> Any:
    import torch

    from mr2nst.core.fast import Student

    torch.manual_seed(seed)
    return Student(config)


def _resumed(settings: FastTrainingSettings, teacher: Teacher, config: Any) -> tuple[Any, Any]:
    """The student and training state saved in ``--out``, checked against this run."""
    from mr2nst.core.lab.student_train import TrainingState
    from mr2nst.node.errors import ConfigError
    from mr2nst.node.methods.fast import load_checkpoint

    if not settings.out.exists():
        raise _usage(f"--resume: {settings.out} does not exist (start without --resume)")
    try:
        checkpoint = load_checkpoint(settings.out)
    except ConfigError as exc:
        raise _usage(f"--resume: {exc}") from None
    if checkpoint.teacher.get("fingerprint") != teacher.fingerprint:
        raise _usage(f"--resume: {settings.out} was trained for another teacher; start a new run")
    if checkpoint.student.config != config:
        raise _usage(f"--resume: {settings.out} has another architecture (--width/--depth)")
    saved = checkpoint.data.get("resume") or {}
    state = TrainingState(
        epoch=int(saved.get("epoch", 0)),
        losses=list(saved.get("losses", [])),
        seconds=float(saved.get("seconds", 0.0)),
        optimizer=saved.get("optimizer"),
        rng=_rng_state(saved.get("rng")),
        torch_rng=saved.get("torch_rng"),
    )
    return checkpoint.student, state


def _rng_state(saved: Any) -> Any:
    """NumPy's PCG64 state, saved as plain strings (torch's safe loader takes no big ints)."""
    if not saved:
        return None
    return {
        "bit_generator": saved["bit_generator"],
        "state": {k: int(v) for k, v in saved["state"].items()},
        "has_uint32": int(saved["has_uint32"]),
        "uinteger": int(saved["uinteger"]),
    }


# -- the teacher cache -------------------------------------------------------------------


def _teacher_outputs(
    settings: FastTrainingSettings,
    teacher: Teacher,
    sources: list[Path],
    student: Any,
    emit: Any,
) -> tuple[list[Any], float]:
    """One training pair per source, from the cache or computed now; the teacher's seconds."""
    import numpy as np
    from tqdm import tqdm

    from mr2nst.core.lab.student_train import Pair

    folder = _cache_folder(settings.cache_dir, teacher.fingerprint, emit)
    pairs, seconds, computed = [], 0.0, 0
    for path in tqdm(sources, desc="teacher", unit="image", disable=not settings.progress):
        entry = folder / f"{_file_key(path)}.npz"
        if not entry.is_file():
            started = time.perf_counter()
            start, mask, output = _run_teacher(teacher.method, path)
            atomic_write(entry, _npz_writer(start=start, mask=mask, teacher=output))
            seconds += time.perf_counter() - started
            computed += 1
            emit({"event": "teacher", "source": str(path), "seconds": round(seconds, 2)})
        with np.load(entry) as data:
            pairs.append(Pair.of(data["start"], data["mask"], data["teacher"], student))
    emit({"event": "teacher_cache", "computed": computed, "cached": len(sources) - computed})
    return pairs, seconds


def _cache_folder(root: Path, fingerprint: str, emit: Any) -> Path:
    """``root/<fingerprint>``; other teachers' entries are removed (they can never be used)."""
    root.mkdir(parents=True, exist_ok=True)
    stale = [p for p in root.iterdir() if p.is_dir() and p.name != fingerprint]
    for old in stale:
        shutil.rmtree(old)
    if stale:
        emit({"event": "teacher_cache_invalidated", "removed": [p.name for p in stale]})
    folder = root / fingerprint
    folder.mkdir(exist_ok=True)
    return folder


def _file_key(path: Path) -> str:
    """A cache key of the source file's bytes (a changed file is a new source)."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:24]


def _run_teacher(method: Any, path: Path) -> tuple[Any, Any, Any]:
    """The teacher's start image, breast mask and engine output for one source file."""
    from mr2nst.node.dicom.pixels import decode
    from mr2nst.node.dicom.scu import read_file
    from mr2nst.node.errors import NodeError

    try:
        decoded = decode(read_file(path))
        prepared = method.prepare(decoded.image, decoded.info)
    except (NodeError, ValueError, OSError) as exc:
        raise _usage(f"{path}: {exc}") from None
    result = method.engine.transfer(
        prepared.content,
        prepared.mask,
        prepared.styles,
        background=0.0,
        init=prepared.init,
        progress=None,
    )
    return prepared.start, prepared.mask, result.image


def _npz_writer(**arrays: Any) -> Any:
    import numpy as np

    def write(fh: BinaryIO) -> None:
        np.savez(fh, **arrays)

    return write


# -- the checkpoint ----------------------------------------------------------------------


def _save(out: Path, student: Any, teacher: Teacher, summary: dict[str, Any], state: Any) -> None:
    """Write the checkpoint atomically (the method reads it; ``--resume`` continues it)."""
    import torch

    from mr2nst.core.fast import STUDENT_REVISION
    from mr2nst.node.methods.fast import CHECKPOINT_KIND

    rng = state.rng
    data = {
        "kind": CHECKPOINT_KIND,
        "revision": STUDENT_REVISION,
        "student": student.config.as_dict(),
        "state_dict": student.state_dict(),
        "teacher": teacher.description,
        "training": json.loads(json.dumps(summary)),
        "resume": {
            "epoch": state.epoch,
            "losses": state.losses,
            "seconds": state.seconds,
            "optimizer": state.optimizer,
            "rng": None
            if rng is None
            else {
                "bit_generator": rng["bit_generator"],
                "state": {k: str(v) for k, v in rng["state"].items()},
                "has_uint32": rng["has_uint32"],
                "uinteger": rng["uinteger"],
            },
            "torch_rng": state.torch_rng,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: torch.save(data, fh))


def _emitter(progress: bool) -> Any:
    """Where progress events go: nowhere extra on a terminal (the bars), else JSON lines."""

    def emit(event: dict[str, Any]) -> None:
        if progress:
            if event["event"] == "epoch":
                print(
                    f"epoch {event['epoch']}/{event['epochs']}: loss {event['total']:.4f} "
                    f"({event['seconds']:.1f} s)",
                    file=sys.stderr,
                )
            return
        print(json.dumps(event), flush=True)

    return emit
