"""Train the CycleGAN baseline on unpaired GE and UIH images: ``mr2nst train-cyclegan``.

1. Every DICOM file of ``--source`` (GE) and ``--target`` (UIH) is decoded as the
   evaluation decodes it, its breast segmented, and the image scaled with
   :func:`~mr2nst.core.intensity.robust_unit` on the breast, background 0: exactly what
   the ``cyclegan`` method feeds the generator (:mod:`mr2nst.node.methods.cyclegan`).
2. Each step draws ``--batch`` random native-resolution crops of each domain,
   independently (unpaired), each centred inside the breast where a few tries find such a
   centre, and runs one CycleGAN step (:class:`~mr2nst.core.lab.cyclegan_train.CycleGan`).
3. After every epoch the checkpoint is written atomically: the generator ``g`` (GE →
   UIH) the method uses, its architecture and the training summary, plus everything
   ``--resume`` continues from (``f``, both discriminators, the optimizers, the image
   pools and the random states).

Progress (``--progress``): one JSON object per epoch on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mr2nst.node.errors import UsageError
from mr2nst.node.files import atomic_write

#: Tries per crop to find a top-left corner whose crop is centred inside the breast.
_CENTRE_TRIES = 20
#: The smallest crop the PatchGAN discriminators can score.
MIN_CROP = 32

Image = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CycleGanTrainingSettings:
    """One ``mr2nst train-cyclegan`` run: its command-line options."""

    source: str
    target: str
    out: Path
    epochs: int = 10
    steps_per_epoch: int = 100
    crop: int = 96
    batch: int = 4
    resume: bool = False
    seed: int = 0
    width: int = 16
    depth: int = 2
    blocks: int = 2
    progress: bool = False  # one JSON line per epoch on stderr
    device: str = "cpu"  # "cpu" or "cuda"


def _usage(message: str) -> UsageError:
    return UsageError(f"train-cyclegan: {message}")


def train_cyclegan(settings: CycleGanTrainingSettings) -> dict[str, Any]:
    """Train the CycleGAN baseline as ``mr2nst train-cyclegan`` does.

    Returns:
        The checkpoint's training summary.

    Raises:
        UsageError: an input, setting or saved state that does not fit (exit 2, one line).
    """
    import torch

    from mr2nst.core.cyclegan import GeneratorConfig
    from mr2nst.core.errors import EngineConfigError
    from mr2nst.core.lab.cyclegan_train import CycleGan, CycleGanSettings

    _check_numbers(settings)
    if settings.device not in ("cpu", "cuda"):
        raise _usage(f"--device {settings.device!r}: expected cpu or cuda")
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise _usage("--device cuda: no CUDA device is available here (use --device cpu)")
    try:
        config = GeneratorConfig(width=settings.width, depth=settings.depth, blocks=settings.blocks)
    except (EngineConfigError, ValueError) as exc:
        raise _usage(str(exc)) from None
    if settings.crop % config.stride:
        raise _usage(f"--crop {settings.crop}: must be a multiple of the stride {config.stride}")
    saved: dict[str, Any] | None = None
    if settings.resume:
        saved = _resumed(settings, config)
        done = len(saved["resume"]["losses"])
        if done >= settings.epochs:
            raise _usage(f"{settings.out} already has {done} epochs; raise --epochs")
    elif settings.out.exists():
        raise _usage(f"{settings.out} exists: pass --resume to continue, or delete it")
    source = _images("--source", settings.source, settings.crop)
    target = _images("--target", settings.target, settings.crop)
    train_settings = CycleGanSettings(**saved["settings"]) if saved else CycleGanSettings()
    model = CycleGan(config, train_settings, seed=settings.seed)
    model.to(settings.device)  # before restoring: the optimizers' state follows the weights
    rng = np.random.default_rng(settings.seed)
    losses: list[dict[str, float]] = []
    seconds = 0.0
    if saved is not None:
        _restore(model, saved, rng)
        losses, seconds = list(saved["resume"]["losses"]), float(saved["resume"]["seconds"])
    start = len(losses)
    summary: dict[str, Any] = {
        "source_dir": str(settings.source),
        "target_dir": str(settings.target),
        "source_images": len(source),
        "target_images": len(target),
        "source_shapes": _shapes(source),
        "target_shapes": _shapes(target),
        "steps_per_epoch": settings.steps_per_epoch,
        "crop": settings.crop,
        "batch": settings.batch,
        "seed": settings.seed,
        "parameters": sum(p.numel() for p in model.g.parameters()),
        "torch_threads": torch.get_num_threads(),
        "device": settings.device,
    }
    model.train()
    for epoch in range(start + 1, settings.epochs + 1):
        started = time.perf_counter()
        totals: dict[str, float] = {}
        for _ in range(settings.steps_per_epoch):
            ge = _batch(source, settings.batch, settings.crop, rng).to(settings.device)
            uih = _batch(target, settings.batch, settings.crop, rng).to(settings.device)
            for name, value in model.step(ge, uih).items():
                totals[name] = totals.get(name, 0.0) + value
        took = time.perf_counter() - started
        seconds += took
        means = {k: round(v / settings.steps_per_epoch, 5) for k, v in totals.items()}
        losses.append({"epoch": epoch, **means, "seconds": round(took, 2)})
        summary.update(epochs=epoch, losses=losses, seconds=round(seconds, 1))
        _save(settings.out, model, config, summary, rng)
        if settings.progress:
            event = {"event": "epoch", "epoch": epoch, "epochs": settings.epochs, **losses[-1]}
            print(json.dumps(event), file=sys.stderr, flush=True)
    return summary


# -- inputs ----------------------------------------------------------------------------


def _check_numbers(settings: CycleGanTrainingSettings) -> None:
    """One line for the first option out of range."""
    for name, value, low in (
        ("--epochs", settings.epochs, 1),
        ("--steps-per-epoch", settings.steps_per_epoch, 1),
        ("--batch", settings.batch, 1),
        ("--crop", settings.crop, MIN_CROP),
    ):
        if value < low:
            raise _usage(f"{name} {value}: must be at least {low}")


def _images(option: str, folder: str, crop: int) -> list[Image]:
    """Every DICOM image under ``folder`` scaled as the method scales it (background 0).

    Files that are not DICOM are skipped; an image smaller than ``crop`` is refused.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from mr2nst.bank.bank import iter_files
    from mr2nst.bank.dicom_image import decode
    from mr2nst.bank.errors import BankError
    from mr2nst.core.intensity import robust_unit
    from mr2nst.core.segmentation import segment_breast

    root = Path(folder)
    if not root.is_dir():
        raise _usage(f"{option} {folder}: not a directory")
    images: list[Image] = []
    for path in iter_files([root]):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError):
            continue  # not DICOM: skipped
        try:
            decoded = decode(ds)
        except (BankError, ValueError, AttributeError) as exc:
            raise _usage(f"{path}: {exc}") from None
        mask = segment_breast(decoded.image, decoded.info.view).mask
        unit = robust_unit(decoded.image, mask)
        unit[~mask] = np.float32(0.0)
        if min(unit.shape) < crop:
            raise _usage(
                f"--crop {crop}: larger than {path.name} ({unit.shape[0]}x{unit.shape[1]})"
            )
        images.append(np.ascontiguousarray(unit, dtype=np.float32))
    if not images:
        raise _usage(f"{option} {folder}: no DICOM files")
    return images


def _shapes(images: list[Image]) -> list[str]:
    return sorted({f"{i.shape[0]}x{i.shape[1]}" for i in images})


def _crop(image: Image, crop: int, rng: np.random.Generator) -> Image:
    """A random ``crop`` × ``crop`` window, centred inside the breast when a try finds one."""
    h, w = image.shape
    half = crop // 2
    y = x = 0
    for _ in range(_CENTRE_TRIES):
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        if image[y + half, x + half] > 0:  # background is 0 exactly
            break
    return image[y : y + crop, x : x + crop]


def _batch(images: list[Image], batch: int, crop: int, rng: np.random.Generator) -> Any:
    """``(batch, 1, crop, crop)`` crops of images drawn at random."""
    import torch

    picks = rng.integers(0, len(images), size=batch)
    crops = np.stack([_crop(images[int(i)], crop, rng) for i in picks])
    return torch.from_numpy(crops[:, None].copy())


# -- the checkpoint ----------------------------------------------------------------------


def _resumed(settings: CycleGanTrainingSettings, config: Any) -> dict[str, Any]:
    """The checkpoint in ``--out``, checked against this run's architecture."""
    from mr2nst.node.errors import ConfigError
    from mr2nst.node.methods.cyclegan import load_checkpoint

    if not settings.out.exists():
        raise _usage(f"--resume: {settings.out} does not exist (start without --resume)")
    try:
        checkpoint = load_checkpoint(settings.out)
    except ConfigError as exc:
        raise _usage(f"--resume: {exc}") from None
    if checkpoint.config != config:
        found = checkpoint.config
        raise _usage(
            f"--resume: {settings.out} has another architecture (width {found.width} depth "
            f"{found.depth} blocks {found.blocks}; --width/--depth/--blocks)"
        )
    if not isinstance(checkpoint.data.get("resume"), dict):
        raise _usage(f"--resume: {settings.out} holds no training state")
    return checkpoint.data


def _restore(model: Any, saved: dict[str, Any], rng: np.random.Generator) -> None:
    """Networks, optimizers, pools and random states as saved."""
    import torch

    for name in ("g", "f", "d_uih", "d_ge"):
        getattr(model, name).load_state_dict(saved[name])
    state = saved["resume"]
    model.opt_g.load_state_dict(state["opt_g"])
    model.opt_d.load_state_dict(state["opt_d"])
    for name in ("pool_uih", "pool_ge"):
        pool, data = getattr(model, name), state[name]
        device = next(model.parameters()).device
        pool.items = [item.to(device) for item in data["items"]]
        version, internal, gauss = data["rng"]
        pool.rng.setstate((int(version), tuple(int(v) for v in internal), gauss))
    saved_rng = state["rng"]
    rng.bit_generator.state = {
        "bit_generator": saved_rng["bit_generator"],
        "state": {k: int(v) for k, v in saved_rng["state"].items()},
        "has_uint32": int(saved_rng["has_uint32"]),
        "uinteger": int(saved_rng["uinteger"]),
    }
    torch.set_rng_state(state["torch_rng"])


def _save(
    out: Path, model: Any, config: Any, summary: dict[str, Any], rng: np.random.Generator
) -> None:
    """Write the checkpoint atomically (the method reads ``g``; ``--resume`` the rest)."""
    import torch

    from mr2nst.core.cyclegan import CYCLEGAN_REVISION
    from mr2nst.node.methods.cyclegan import CHECKPOINT_KIND

    state = rng.bit_generator.state

    def pool(p: Any) -> dict[str, Any]:
        version, internal, gauss = p.rng.getstate()
        items = [item.cpu() for item in p.items]
        return {"items": items, "rng": [version, list(internal), gauss]}

    training = json.loads(json.dumps(summary))
    data = {
        "kind": CHECKPOINT_KIND,
        "revision": CYCLEGAN_REVISION,
        "generator": config.as_dict(),
        "settings": model.settings.as_dict(),
        "g": model.g.state_dict(),
        "f": model.f.state_dict(),
        "d_uih": model.d_uih.state_dict(),
        "d_ge": model.d_ge.state_dict(),
        "training": training,
        "resume": {
            "losses": training["losses"],
            "seconds": float(summary["seconds"]),
            "opt_g": model.opt_g.state_dict(),
            "opt_d": model.opt_d.state_dict(),
            "pool_uih": pool(model.pool_uih),
            "pool_ge": pool(model.pool_ge),
            # NumPy's PCG64 state as strings: torch's safe loader takes no big ints.
            "rng": {
                "bit_generator": state["bit_generator"],
                "state": {k: str(v) for k, v in state["state"].items()},
                "has_uint32": state["has_uint32"],
                "uinteger": state["uinteger"],
            },
            "torch_rng": torch.get_rng_state(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda fh: torch.save(data, fh))
