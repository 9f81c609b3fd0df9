"""``mr2nst train-refiner``: train the refiner on a site's own images.

See METHOD.md "Refiner training".

1. Check every file first: sources must come from a manufacturer matching
   ``--source-manufacturer`` (default ``GE*``), targets from ``--target-manufacturer``
   (default ``UIH*``), and both must be CC or MLO views. The first file that does not fit
   stops the command (exit 2) with one line naming the file and what was found.
2. Compute what the refiner mixes (the scales S0..S{n-1}, or their frequency bands with
   ``engine.merge = "bands"``) for every source with the engine exactly as the node's
   ``mr2nst`` method does (same segmentation, bank references, robust scaling), and cache
   them as ``.npy`` under ``--cache`` (default ``OUT.parent/refiner-cache``), in a folder
   keyed by the method's fingerprint (engine settings, weights id, references, bank) and
   files named by SOP Instance UID. Finished sources are skipped on a rerun; files are
   written atomically, so an interrupted run leaves no half-written cache entry.
3. Train R against D (:mod:`mr2nst.core.lab.refiner_train`) for ``--epochs`` epochs in total.
   After every epoch the full training state goes to ``OUT.state`` (for ``--resume``)
   and the refiner so far to ``OUT`` (with the engine expectation and training metadata),
   so ``engine.refiner = OUT`` works after any finished epoch.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

CROPS_PER_SOURCE = 16  # crops of each source per epoch when --steps is not given
VIEWS = ("CC", "MLO")
STATE_FORMAT = 1


@dataclass(frozen=True)
class _Input:
    path: Path
    uid: str


def _usage(message: str) -> Exception:
    from mr2nst.node.errors import UsageError

    return UsageError(f"train-refiner: {message}")


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


def _save_npy(path: Path, array: Any) -> None:
    import numpy as np

    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


class _Recorder:
    """Wraps the engine so the method's own ``transfer`` call can be observed."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.last: tuple[Any, Any] | None = None  # (EngineResult, mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def transfer(self, content: Any, content_mask: Any, references: Any, **kw: Any) -> Any:
        result = self._engine.transfer(content, content_mask, references, **kw)
        self.last = (result, content_mask)
        return result


def _decode(path: Path) -> Any:
    import pydicom

    from mr2nst.bank.dicom_image import decode
    from mr2nst.bank.errors import PixelError

    try:
        return decode(pydicom.dcmread(path))
    except PixelError as exc:
        raise _usage(f"{path}: {exc}") from None


def _source_scales(
    inputs: list[_Input], method: Any, recorder: _Recorder, folder: Path, progress: bool
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
            assert recorder.last is not None
            result, mask = recorder.last
            _save_npy(mask_path, np.asarray(mask, dtype=np.bool_))
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


def _atomic_torch_save(value: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    os.replace(tmp, path)


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


def run(args: argparse.Namespace) -> int:
    import torch

    from mr2nst.bank.bank import Bank
    from mr2nst.core.engine import Mr2nstEngine, resolved_device
    from mr2nst.core.lab.refiner_train import TrainSettings, TrainState, train_epoch
    from mr2nst.core.refiner import save_refiner
    from mr2nst.node.config import load_config
    from mr2nst.node.methods.mr2nst import Mr2nstMethod
    from mr2nst.node.methods.weights import ensure_weights
    from mr2nst.node.version import VERSION

    if args.epochs < 1:
        raise _usage("--epochs must be >= 1")
    if args.steps < 0:
        raise _usage("--steps must be >= 0")
    progress = sys.stderr.isatty()
    config = load_config(args.config)
    out = Path(args.out)
    state_path = out.with_name(out.name + ".state")
    if state_path.exists() and not args.resume:
        raise _usage(
            f"{state_path} exists: pass --resume to continue that run, or delete it to start over"
        )
    sources = _inputs(args.source, "source", args.source_manufacturer)
    targets = _inputs(args.target, "target", args.target_manufacturer)
    bank = Bank(config.bank.path)
    if not bank.entries():
        raise _usage(
            f"bank {config.bank.path} has no references (add UIH images with `mr2nst bank add`)"
        )
    imagenet = None
    if args.d_weights:
        try:
            imagenet = torch.load(args.d_weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # edge: missing or unreadable file
            raise _usage(
                f"--d-weights {args.d_weights}: cannot read ({exc.__class__.__name__})"
            ) from None

    weights = ensure_weights(config.engine)
    core = replace(config.engine.core(), weights=weights or "")
    recorder = _Recorder(Mr2nstEngine(core))  # untrained refiner: the scales come before it
    method = Mr2nstMethod(
        recorder,
        bank,
        config.engine.references,  # type: ignore[arg-type, unused-ignore]
        config.bank.allow_fewer,
        VERSION,
    )
    expected = recorder.refiner_expectation()
    key = hashlib.sha256(method.fingerprint().encode()).hexdigest()[:16]
    cache = Path(args.cache) if args.cache else out.parent / "refiner-cache"
    out.parent.mkdir(parents=True, exist_ok=True)

    src_images, computed = _source_scales(
        sources, method, recorder, cache / f"scales-{key}", progress
    )
    print(
        f"scales of {len(sources)} sources: {computed} computed, {len(sources) - computed} "
        f"from the cache ({cache / f'scales-{key}'})"
    )
    tgt_key = hashlib.sha256(f"targets:{VERSION}".encode()).hexdigest()[:12]
    tgt_images = _target_images(targets, cache / f"targets-{tgt_key}", progress)

    smallest = min(min(im.mask.shape) for im in src_images + tgt_images)
    crop = min(args.crop, smallest)
    if crop < 32:
        raise _usage(f"the smallest image side is {smallest} pixels; crops need at least 32")
    if crop < args.crop:
        print(
            f"crop {args.crop} is larger than the smallest image side; using {crop}",
            file=sys.stderr,
        )
    try:
        settings = TrainSettings(
            crop=crop, batch=args.batch, lr_g=args.lr_g, lr_d=args.lr_d, seed=args.seed
        )
    except ValueError as exc:
        raise _usage(str(exc)) from None
    steps = args.steps or max(1, math.ceil(len(sources) * CROPS_PER_SOURCE / settings.batch))
    run = {
        "settings": settings.to_dict(),
        "steps": steps,
        "sources": [s.uid for s in sources],
        "targets": [t.uid for t in targets],
        "scales_key": key,
        "d_init": Path(args.d_weights).name if args.d_weights else "",
    }
    device = resolved_device(core)
    if args.resume and state_path.exists():
        state = _load_state(state_path, expected, run, device)
        print(f"resuming after epoch {state.epoch} (step {state.step}) from {state_path}")
    else:
        try:
            state = TrainState.create(len(core.grids), settings, imagenet, device=device)
        except ValueError as exc:  # --d-weights is not a resnet18 state dict
            raise _usage(f"--d-weights {args.d_weights}: {exc}") from None

    def training_info() -> dict[str, Any]:
        return {
            "mr2nst_version": VERSION,
            "epochs": state.epoch,
            "steps": state.step,
            "steps_per_epoch": steps,
            "settings": settings.to_dict(),
            "generator_loss": "non-saturating -log D(R(S))",
            "discriminator": "resnet18, 1 channel, "
            + (f"ImageNet init from {run['d_init']}" if run["d_init"] else "random init"),
            "sources": len(sources),
            "targets": len(targets),
            "scales_key": key,
            "history": [dict(h) for h in state.history],
        }

    while state.epoch < args.epochs:
        bar, update = _epoch_bar(progress, state.epoch, args.epochs, steps)
        try:
            means = train_epoch(state, src_images, tgt_images, steps, progress=update)
        finally:
            bar.close()
        _atomic_torch_save(
            {
                "format": STATE_FORMAT,
                "train": state.state_dict(),
                "expectation": expected,
                "run": run,
            },
            state_path,
        )
        tmp = out.with_name(out.name + ".tmp")
        save_refiner(state.refiner, tmp, expected, training=training_info())
        os.replace(tmp, out)
        print(
            f"epoch {state.epoch}/{args.epochs}: loss_d {means['loss_d']:.4f} "
            f"loss_g {means['loss_g']:.4f} D(real) {means['d_real']:.3f} "
            f"D(fake) {means['d_fake']:.3f}; saved {out}",
            flush=True,
        )
    if not out.exists():  # resumed a run that had already reached --epochs
        save_refiner(state.refiner, out, expected, training=training_info())
    print(f"refiner trained for {state.epoch} epochs ({state.step} steps): {out}")
    return 0
