"""Train the refiner on a site's own images: the work of ``mr2nst train-refiner``.

The inputs are checked first (vendor and view of every file), then the scales the refiner
mixes are computed for every source with the node's own ``mr2nst`` method and cached,
then R is trained against D (:mod:`mr2nst.core.lab.refiner_train`), with a checkpoint
after every epoch. docs/operations.md, "Training the refiner", describes the command,
its cache and the files it writes.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, BinaryIO

from mr2nst.node.errors import UsageError
from mr2nst.node.files import atomic_write

CROPS_PER_SOURCE = 16  # crops of each source per epoch when --steps is not given
VIEWS = ("CC", "MLO")
STATE_FORMAT = 1


@dataclass(frozen=True)
class RefinerTrainingSettings:
    """One ``mr2nst train-refiner`` run: its command-line options.

    ``source``, ``target``, ``config`` and ``d_weights`` are kept as given, since the
    messages quote them.
    """

    source: str
    target: str
    out: Path
    config: str | None = None
    epochs: int = 10
    resume: bool = False
    seed: int = 0
    crop: int = 256
    batch: int = 8
    steps: int = 0  # 0: CROPS_PER_SOURCE crops per source image
    lr_g: float = 1e-3
    lr_d: float = 1e-4
    cache: Path | None = None  # None: OUT.parent/refiner-cache
    source_manufacturer: str = "GE*"
    target_manufacturer: str = "UIH*"
    d_weights: str | None = None
    progress: bool = False  # progress bars on stderr

    @property
    def state_path(self) -> Path:
        """Where the full training state goes (``OUT.state``)."""
        return self.out.with_name(self.out.name + ".state")

    @property
    def cache_dir(self) -> Path:
        """The scale cache: ``cache``, or ``OUT.parent/refiner-cache``."""
        return self.cache if self.cache is not None else self.out.parent / "refiner-cache"


def train_refiner(settings: RefinerTrainingSettings) -> None:
    """Train the refiner as ``mr2nst train-refiner`` does and print its progress.

    Args:
        settings: the run's options.

    Raises:
        UsageError: an input, setting or saved state that does not fit (exit 2, one line).
        ConfigError: the node config is invalid.
    """
    from mr2nst.node.config import load_config

    _check_numbers(settings)
    config = load_config(settings.config)
    if settings.state_path.exists() and not settings.resume:
        raise _usage(
            f"{settings.state_path} exists: pass --resume to continue that run, "
            "or delete it to start over"
        )
    sources = _inputs(settings.source, "source", settings.source_manufacturer)
    targets = _inputs(settings.target, "target", settings.target_manufacturer)
    setup = _Setup.build(config, settings)
    src_images, tgt_images = _cached_images(settings, setup, sources, targets)
    plan = _plan(settings, setup, sources, targets, src_images + tgt_images)
    state = _start_state(settings, setup, plan)
    _train(settings, setup, plan, state, src_images, tgt_images)


# -- inputs and checks --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Input:
    path: Path
    uid: str


def _usage(message: str) -> UsageError:
    return UsageError(f"train-refiner: {message}")


def _check_numbers(settings: RefinerTrainingSettings) -> None:
    if settings.epochs < 1:
        raise _usage("--epochs must be >= 1")
    if settings.steps < 0:
        raise _usage("--steps must be >= 0")


def _inputs(folder: str, role: str, glob: str) -> list[_Input]:
    """Every file under ``folder``, checked to be a CC/MLO image of the expected vendor."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from mr2nst.bank.dicom_image import source_info

    root = Path(folder)
    if not root.is_dir():
        raise _usage(f"--{role} {folder}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise _usage(f"--{role} {folder}: no files")
    out: list[_Input] = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
            raise _usage(f"{path}: not a readable DICOM file ({exc.__class__.__name__})") from None
        info = source_info(ds)
        found = f"Manufacturer {info.manufacturer or '<none>'!r}, view {info.view or '<none>'!r}"
        if not fnmatchcase(info.manufacturer.upper(), glob.upper()) or info.view not in VIEWS:
            raise _usage(
                f"{path}: expected a {role} image from a manufacturer matching {glob!r} "
                f"with view CC or MLO, found {found}"
            )
        uid = str(ds.get("SOPInstanceUID", "")).strip()
        if not uid or any(c not in "0123456789." for c in uid):
            raise _usage(f"{path}: missing or malformed SOPInstanceUID")
        out.append(_Input(path, uid))
    return out


def _d_weights(path: str | None) -> Any:
    """The ImageNet resnet18 state dict of ``--d-weights``, or None."""
    import torch

    if not path:
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # edge: missing or unreadable file
        raise _usage(f"--d-weights {path}: cannot read ({exc.__class__.__name__})") from None


@dataclass(frozen=True)
class _Setup:
    """The engine and method the scales come from, and what they fix for the refiner."""

    method: Any  # Mr2nstMethod, keeping its last run
    core: Any  # the engine's EngineConfig
    expected: dict[str, Any]  # the engine's refiner expectation
    key: str  # the scale cache's key: a hash of the method's fingerprint
    imagenet: Any  # D's ImageNet initialisation, or None

    @classmethod
    def build(cls, config: Any, settings: RefinerTrainingSettings) -> _Setup:
        """Check the bank, read ``--d-weights``, then build the engine and the method."""
        from mr2nst.bank.bank import Bank
        from mr2nst.core.engine import Mr2nstEngine
        from mr2nst.node.methods.mr2nst import Mr2nstMethod
        from mr2nst.node.methods.weights import ensure_weights
        from mr2nst.node.version import VERSION

        bank = Bank(config.bank.path)
        if not bank.entries():
            raise _usage(
                f"bank {config.bank.path} has no references (add UIH images with `mr2nst bank add`)"
            )
        imagenet = _d_weights(settings.d_weights)
        weights = ensure_weights(config.engine)
        core = replace(config.engine.core(), weights=weights or "")
        engine = Mr2nstEngine(core)  # untrained refiner: the scales come before it
        method = Mr2nstMethod(
            engine, bank, config.methods.references, config.bank.allow_fewer, VERSION
        )
        method.keep_last = True  # the scales of each call are read from method.last
        key = hashlib.sha256(method.fingerprint().encode()).hexdigest()[:16]
        return cls(method, core, engine.refiner_expectation(), key, imagenet)


# -- the cache of scales ------------------------------------------------------------------------


def _save_npy(path: Path, array: Any) -> None:
    import numpy as np

    atomic_write(path, lambda fh: np.save(fh, array))


def _decode(path: Path) -> Any:
    import pydicom

    from mr2nst.bank.dicom_image import decode
    from mr2nst.bank.errors import PixelError

    try:
        return decode(pydicom.dcmread(path))
    except PixelError as exc:
        raise _usage(f"{path}: {exc}") from None


def _cached_images(
    settings: RefinerTrainingSettings,
    setup: _Setup,
    sources: list[_Input],
    targets: list[_Input],
) -> tuple[list[Any], list[Any]]:
    """The sources' scales and the scaled targets, computed where the cache lacks them."""
    from mr2nst.node.version import VERSION

    cache = settings.cache_dir
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    folder = cache / f"scales-{setup.key}"
    src_images, computed = _source_scales(sources, setup.method, folder, settings.progress)
    print(
        f"scales of {len(sources)} sources: {computed} computed, {len(sources) - computed} "
        f"from the cache ({folder})"
    )
    tgt_key = hashlib.sha256(f"targets:{VERSION}".encode()).hexdigest()[:12]
    tgt_images = _target_images(targets, cache / f"targets-{tgt_key}", settings.progress)
    return src_images, tgt_images


def _source_scales(
    inputs: list[_Input], method: Any, folder: Path, progress: bool
) -> tuple[list[Any], int]:
    """(TrainImages of S0.., number computed now); the rest come from the cache."""
    import numpy as np
    from tqdm import tqdm

    from mr2nst.bank.errors import PixelError
    from mr2nst.core.lab.refiner_train import TrainImage

    folder.mkdir(parents=True, exist_ok=True)
    computed = 0
    images = []
    for item in tqdm(inputs, desc="scales", unit="image", disable=not progress):
        scales_path, mask_path = folder / f"{item.uid}.scales.npy", folder / f"{item.uid}.mask.npy"
        if not (scales_path.is_file() and mask_path.is_file()):
            decoded = _decode(item.path)
            try:
                method(decoded.image, decoded.info)
            except PixelError as exc:  # e.g. no pixel spacing to measure the breast with
                raise _usage(f"{item.path}: {exc}") from None
            assert method.last is not None
            prepared, result = method.last
            _save_npy(mask_path, np.asarray(prepared.mask, dtype=np.bool_))
            _save_npy(scales_path, np.stack(result.merge_inputs).astype(np.float32))
            computed += 1
        images.append(
            TrainImage.from_arrays(
                np.load(scales_path, mmap_mode="r"), np.load(mask_path, mmap_mode="r")
            )
        )
    return images, computed


def _target_images(inputs: list[_Input], folder: Path, progress: bool) -> list[Any]:
    """Targets scaled like the references the engine sees (robust unit, breast mask)."""
    import numpy as np
    from tqdm import tqdm

    from mr2nst.core.intensity import robust_unit
    from mr2nst.core.lab.refiner_train import TrainImage
    from mr2nst.core.segmentation import segment_breast

    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for item in tqdm(inputs, desc="targets", unit="image", disable=not progress):
        image_path, mask_path = folder / f"{item.uid}.image.npy", folder / f"{item.uid}.mask.npy"
        if not (image_path.is_file() and mask_path.is_file()):
            decoded = _decode(item.path)
            mask = segment_breast(decoded.image, decoded.info.view).mask
            _save_npy(mask_path, mask)
            _save_npy(image_path, robust_unit(decoded.image, mask)[None])
        images.append(
            TrainImage.from_arrays(
                np.load(image_path, mmap_mode="r"), np.load(mask_path, mmap_mode="r")
            )
        )
    return images


# -- the training plan and state ----------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What the run trains with; ``record`` is saved with the state and checked on resume."""

    train: Any  # TrainSettings
    steps: int  # per epoch
    record: dict[str, Any]
    sources: int
    targets: int


def _plan(
    settings: RefinerTrainingSettings,
    setup: _Setup,
    sources: list[_Input],
    targets: list[_Input],
    images: list[Any],
) -> _Plan:
    """The crop (at most the smallest image side), the training settings and steps."""
    from mr2nst.core.lab.refiner_train import TrainSettings

    smallest = min(min(im.mask.shape) for im in images)
    crop = min(settings.crop, smallest)
    if crop < 32:
        raise _usage(f"the smallest image side is {smallest} pixels; crops need at least 32")
    if crop < settings.crop:
        print(
            f"crop {settings.crop} is larger than the smallest image side; using {crop}",
            file=sys.stderr,
        )
    try:
        train = TrainSettings(
            crop=crop,
            batch=settings.batch,
            lr_g=settings.lr_g,
            lr_d=settings.lr_d,
            seed=settings.seed,
        )
    except ValueError as exc:
        raise _usage(str(exc)) from None
    steps = settings.steps or max(1, math.ceil(len(sources) * CROPS_PER_SOURCE / train.batch))
    record = {
        "settings": train.to_dict(),
        "steps": steps,
        "sources": [s.uid for s in sources],
        "targets": [t.uid for t in targets],
        "scales_key": setup.key,
        "d_init": Path(settings.d_weights).name if settings.d_weights else "",
    }
    return _Plan(train, steps, record, len(sources), len(targets))


def _start_state(settings: RefinerTrainingSettings, setup: _Setup, plan: _Plan) -> Any:
    """The saved state with ``--resume`` (when there is one), else a fresh one."""
    from mr2nst.core.engine import resolved_device
    from mr2nst.core.lab.refiner_train import TrainState

    device = resolved_device(setup.core)
    if settings.resume and settings.state_path.exists():
        state = _load_state(settings.state_path, setup.expected, plan.record, device)
        print(f"resuming after epoch {state.epoch} (step {state.step}) from {settings.state_path}")
        return state
    try:
        return TrainState.create(len(setup.core.grids), plan.train, setup.imagenet, device=device)
    except ValueError as exc:  # --d-weights is not a resnet18 state dict
        raise _usage(f"--d-weights {settings.d_weights}: {exc}") from None


def _load_state(path: Path, expected: dict[str, Any], run: dict[str, Any], device: Any) -> Any:
    """The saved run, refused when it was for other settings, images or engine."""
    import torch

    from mr2nst.core.lab.refiner_train import TrainState

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown format {saved.get('format')!r}")
        state = TrainState.from_state_dict(saved["train"], device=device)
    except Exception as exc:  # edge: any unreadable state file is a usage problem
        raise _usage(f"cannot resume from {path}: {exc}") from None
    if saved["expectation"] != expected:
        raise _usage(
            f"{path} was saved for another engine setup or weights; "
            "start over without --resume (delete it first)"
        )
    for key, value in run.items():
        if saved["run"].get(key) != value:
            raise _usage(
                f"--resume: {key} differs from the saved run "
                f"(saved {saved['run'].get(key)!r}, now {value!r})"
            )
    return state


# -- the training loop and checkpoints ----------------------------------------------------------


def _train(
    settings: RefinerTrainingSettings,
    setup: _Setup,
    plan: _Plan,
    state: Any,
    src_images: list[Any],
    tgt_images: list[Any],
) -> None:
    """Train up to ``settings.epochs``, saving state and refiner after every epoch."""
    from mr2nst.core.lab.refiner_train import train_epoch

    out = settings.out
    while state.epoch < settings.epochs:
        bar, update = _epoch_bar(settings.progress, state.epoch, settings.epochs, plan.steps)
        try:
            means = train_epoch(state, src_images, tgt_images, plan.steps, progress=update)
        finally:
            bar.close()
        _save_state(settings.state_path, state, setup.expected, plan.record)
        _save_refiner(out, state, setup.expected, _training_info(plan, state))
        print(
            f"epoch {state.epoch}/{settings.epochs}: loss_d {means['loss_d']:.4f} "
            f"loss_g {means['loss_g']:.4f} D(real) {means['d_real']:.3f} "
            f"D(fake) {means['d_fake']:.3f}; saved {out}",
            flush=True,
        )
    if not out.exists():  # resumed a run that had already reached --epochs
        _save_refiner(out, state, setup.expected, _training_info(plan, state))
    print(f"refiner trained for {state.epoch} epochs ({state.step} steps): {out}")


def _epoch_bar(
    progress: bool, epoch: int, epochs: int, steps: int
) -> tuple[Any, Callable[[Any], None]]:
    from tqdm import tqdm

    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", disable=not progress)

    def update(p: Any) -> None:
        bar.update()
        bar.set_postfix(
            loss_d=f"{p.losses.loss_d:.3f}",
            loss_g=f"{p.losses.loss_g:.3f}",
            d_real=f"{p.losses.d_real:.2f}",
            d_fake=f"{p.losses.d_fake:.2f}",
        )

    return bar, update


def _training_info(plan: _Plan, state: Any) -> dict[str, Any]:
    """The checkpoint's ``training`` metadata."""
    from mr2nst.node.version import VERSION

    d_init = plan.record["d_init"]
    return {
        "mr2nst_version": VERSION,
        "epochs": state.epoch,
        "steps": state.step,
        "steps_per_epoch": plan.steps,
        "settings": plan.train.to_dict(),
        "generator_loss": "non-saturating -log D(R(S))",
        "discriminator": "resnet18, 1 channel, "
        + (f"ImageNet init from {d_init}" if d_init else "random init"),
        "sources": plan.sources,
        "targets": plan.targets,
        "scales_key": plan.record["scales_key"],
        "history": [dict(h) for h in state.history],
    }


def _save_state(path: Path, state: Any, expected: dict[str, Any], run: dict[str, Any]) -> None:
    """``OUT.state``: everything ``--resume`` needs, written atomically."""
    import torch

    value = {
        "format": STATE_FORMAT,
        "train": state.state_dict(),
        "expectation": expected,
        "run": run,
    }
    atomic_write(path, lambda fh: torch.save(value, fh))


def _save_refiner(out: Path, state: Any, expected: dict[str, Any], info: dict[str, Any]) -> None:
    """The refiner so far, written atomically."""
    from mr2nst.core.refiner import save_refiner

    def write(fh: BinaryIO) -> None:
        # save_refiner takes a path: it writes the temporary file by name, and
        # atomic_write's fsync covers that (fsync flushes the file, whichever descriptor wrote).
        save_refiner(state.refiner, fh.name, expected, training=info)

    atomic_write(out, write)
