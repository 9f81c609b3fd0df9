"""Method ``fast``: the feed-forward student of the site's own ``mr2nst`` method.

Everything around the engine stays the teacher's: the breast is segmented, the references
are selected and the content is scaled to [0, 1] exactly as ``mr2nst`` does, and the
output is mapped to the target domain with the same tone step. Only the engine's
optimization is replaced, by one pass of the student (:mod:`mr2nst.core.fast`), tiled
with a halo.

A student is only valid for the teacher it imitated. Its checkpoint records the
teacher's fingerprint (engine settings, feature weights and refiner, ``k``, and the
bank's content); :func:`load_checkpoint` and :func:`check_teacher` refuse a checkpoint
trained for another, naming what to do.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from mr2nst.core.engine import EngineConfig, EngineResult
from mr2nst.core.fast import STUDENT_REVISION, Student, StudentConfig, run_student
from mr2nst.core.intensity import FloatImage
from mr2nst.core.method import MethodResult
from mr2nst.node.errors import ConfigError
from mr2nst.node.methods.mr2nst import Mr2nstMethod, Prepared, ProgressSink

#: What a student checkpoint says it is.
CHECKPOINT_KIND = "mr2nst-fast-student"


def teacher_fingerprint(teacher: Mr2nstMethod) -> str:
    """What the student imitates: the engine (settings, weights, refiner), ``k`` and the bank.

    The node's version is left out, so that an upgrade that does not change the engine
    does not invalidate a site's student.
    """
    blob = json.dumps(
        {
            "engine": teacher.engine.fingerprint(),
            "references": teacher.references,
            "bank": teacher.bank_id(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StudentCheckpoint:
    """A loaded student checkpoint.

    Attributes:
        student: the network, in eval mode.
        teacher: the teacher's fingerprint and description (``fingerprint``, ``engine``, ...).
        training: the training summary (sources, epochs, losses, settings, seconds).
        data: the whole checkpoint dict (``resume`` included), for ``train-fast --resume``.
    """

    student: Student
    teacher: dict[str, Any]
    training: dict[str, Any]
    data: dict[str, Any]


def load_checkpoint(path: str | Path) -> StudentCheckpoint:
    """Read a student checkpoint written by ``mr2nst train-fast``.

    Raises:
        ConfigError: the file is missing, not a student checkpoint, or of another revision.
    """
    where = f"fast.checkpoint {str(path)!r}"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file (train one: mr2nst train-fast)") from None
    except Exception as exc:  # edge: a corrupt or foreign file, whatever torch raises
        raise ConfigError(
            f"{where}: not a readable checkpoint ({exc.__class__.__name__})"
        ) from None
    if not isinstance(data, dict) or data.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(f"{where}: not a fast-student checkpoint (written by train-fast)")
    if data.get("revision") != STUDENT_REVISION:
        raise ConfigError(
            f"{where}: student revision {data.get('revision')}, this build needs "
            f"{STUDENT_REVISION}; retrain with mr2nst train-fast"
        )
    try:
        student = Student(StudentConfig(**data["student"]))
        student.load_state_dict(data["state_dict"])
    except Exception as exc:  # edge: keys or shapes that do not fit the architecture
        raise ConfigError(f"{where}: does not fit the student architecture ({exc})") from None
    return StudentCheckpoint(student.eval(), dict(data["teacher"]), dict(data["training"]), data)


def check_teacher(checkpoint: StudentCheckpoint, teacher: Mr2nstMethod, path: str | Path) -> None:
    """Refuse a student trained for another teacher than ``teacher``.

    Raises:
        ConfigError: the fingerprints differ (one line: both fingerprints, how to fix).
    """
    expected = teacher_fingerprint(teacher)
    found = checkpoint.teacher.get("fingerprint")
    if found != expected:
        raise ConfigError(
            f"fast.checkpoint {str(path)!r}: trained for another mr2nst setup (teacher "
            f"{found}, this config's is {expected}: engine settings, weights, refiner, "
            "references or bank changed); retrain with mr2nst train-fast"
        )


class StudentEngine:
    """Stands in for the engine inside the ``mr2nst`` method: one student pass per image.

    Args:
        student: the trained student.
        teacher_config: the teacher engine's settings (the method reads ``init`` and
            ``tone`` from them, so scaling and tone stay the teacher's).
        teacher: the teacher's fingerprint.
        tile: the inference tile (0: the student's own).
        device: where the student runs.
        teacher_features: the teacher's feature weights id (provenance: a student of a
            ``seeded-random`` teacher says so, as its teacher's outputs do).
    """

    def __init__(
        self,
        student: Student,
        teacher_config: EngineConfig,
        teacher: str,
        tile: int = 0,
        device: str = "cpu",
        teacher_features: str = "",
    ) -> None:
        self.student = student.to(device)
        self._config = teacher_config
        self.teacher = teacher
        self.teacher_features = teacher_features
        self.tile = tile or student.config.tile
        self.device = device

    @property
    def config(self) -> EngineConfig:
        """The teacher engine's settings."""
        return self._config

    @property
    def weights_id(self) -> str:
        """``student:<hash of the student's weights>``."""
        return f"student:{self.student.weights_id()}"

    def fingerprint(self) -> str:
        """The student's weights and tile, and the teacher it imitates."""
        return f"student-{self.student.weights_id()}-t{self.tile}-teacher-{self.teacher}"

    def transfer(
        self,
        content: FloatImage,
        content_mask: npt.NDArray[np.bool_],
        references: Sequence[FloatImage],
        *,
        background: float = 0.0,
        init: FloatImage | None = None,
        progress: ProgressSink | None = None,
    ) -> EngineResult:
        """The student's output for the image the teacher would have started from."""
        started = time.perf_counter()
        start = content if init is None else init
        image = run_student(
            self.student,
            start,
            content_mask,
            tile=self.tile,
            device=self.device,
            detail_sigma=self._config.detail_sigma,
        )
        image = np.clip(image, 0.0, 1.0)
        image[~content_mask] = np.float32(background)
        return EngineResult(
            image=image.astype(np.float32),
            scales=(),
            tiles_optimized=0,
            tiles_skipped=0,
            final_losses=(),
            seconds=time.perf_counter() - started,
        )


class FastMethod(Mr2nstMethod):
    """The ``mr2nst`` method with the student in place of the engine.

    Args:
        engine: the :class:`StudentEngine`.
        (the rest): as :class:`~mr2nst.node.methods.mr2nst.Mr2nstMethod`.
    """

    name = "fast"

    def fingerprint(self) -> str:
        """Method, version, student, teacher, k and bank content."""
        return (
            f"fast-{self.version}-{self.engine.fingerprint()}"
            f"-k{self.references}-bank{self.bank_id()}"
        )

    def finish(self, unit: FloatImage, prepared: Prepared, result: EngineResult) -> MethodResult:
        """The teacher's tone mapping; provenance names the student and its teacher."""
        out = super().finish(unit, prepared, result)
        engine = self.engine
        assert isinstance(engine, StudentEngine)
        cfg = engine.student.config
        notes = (
            f"student width {cfg.width} depth {cfg.depth} "
            f"({engine.student.parameter_count()} parameters)",
            f"teacher mr2nst {engine.teacher}"
            + (f" (features {engine.teacher_features})" if engine.teacher_features else ""),
            f"tone {engine.config.tone}",
        )
        provenance = replace(out.provenance, method=self.name, scales=(), notes=notes)
        return replace(out, provenance=provenance)


def fast_method(
    path: str | Path, teacher: Mr2nstMethod, *, tile: int = 0, device: str = "cpu"
) -> tuple[FastMethod, StudentCheckpoint]:
    """The ``fast`` method of the student at ``path``, checked against ``teacher``.

    The method shares the teacher's bank, references and tone; only the engine is the
    student's.

    Raises:
        ConfigError: the checkpoint cannot be read, or was trained for another teacher.
    """
    checkpoint = load_checkpoint(path)
    check_teacher(checkpoint, teacher, path)
    engine = StudentEngine(
        checkpoint.student,
        teacher.engine.config,
        teacher_fingerprint(teacher),
        tile=tile,
        device=device,
        teacher_features=teacher.engine.weights_id,
    )
    method = FastMethod(
        engine,
        teacher.bank,
        teacher.references,
        teacher.allow_fewer,
        teacher.version,
        refiner_name=teacher.refiner_name,
    )
    return method, checkpoint
