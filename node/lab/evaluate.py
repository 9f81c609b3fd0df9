"""``mr2nst evaluate``: does the normalization work? Inputs, the run, and its files.

Every method runs on every source (:mod:`.runner`), every output is scored
(:mod:`.scoring`), and ``metrics.json``, ``run.json``, the report and the figures are
written (:mod:`.report`). docs/evaluation.md gives the design: the split of the targets,
the common intensity scale, the methods and the metrics.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mr2nst.node.lab.runner import CYCLEGAN, FAST, METHODS, TRAINED, Runner
from mr2nst.node.lab.scoring import IMAGE_METRICS, METRICS, Context, Item, metric_context, score

__all__ = [
    "HELD_OUT_EVERY",
    "METHODS",
    "METRICS",
    "REFERENCE_ROW",
    "TRAINED",
    "FAST",
    "CYCLEGAN",
    "parse_methods",
    "run_evaluation",
    "split_target",
]

HELD_OUT_EVERY = 4  # every 4th target file (by name) is held out: 25 %
REFERENCE_ROW = "true_target"


def parse_methods(text: str | None, error: Callable[[str], Exception]) -> tuple[str, ...]:
    """The ``--methods`` list (all of :data:`METHODS` when empty).

    Raises:
        Exception: ``error(message)`` for an unknown name or an empty list.
    """
    if not text:
        return METHODS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise error(
            f"evaluate: unknown method(s) {unknown or text!r}; choose from {','.join(METHODS)}"
        )
    return names


# -- inputs ------------------------------------------------------------------------------------


def _dicoms(folder: Path) -> list[Path]:
    """The DICOM files under ``folder``, by file name."""
    from mr2nst.bank.bank import iter_files

    return sorted(iter_files([folder]), key=lambda p: (p.name, str(p)))


def _load(path: Path, mask: npt.NDArray[np.bool_] | None = None) -> Item:
    """``path`` decoded to the common scale, with ``mask`` (segmented when absent or unfit)."""
    import pydicom

    from mr2nst.bank.dicom_image import decode
    from mr2nst.core.segmentation import segment_breast

    decoded = decode(pydicom.dcmread(path))
    if mask is None or mask.shape != decoded.image.shape:
        mask = segment_breast(decoded.image, decoded.info.view).mask
    return Item(path.stem, path, decoded.image, np.asarray(mask, dtype=bool), decoded.info)


def _truth_files(truth: Path, source_dir: Path, sources: Sequence[Path]) -> dict[str, Path]:
    """Every file under ``truth`` by name, skipping the source files themselves (also through
    links) and anything under the source folder."""
    src = source_dir.resolve()
    own = {p.resolve() for p in sources}
    found: dict[str, Path] = {}
    for path in sorted(p for p in truth.rglob("*") if p.is_file()):
        real = path.resolve()
        if real not in own and not real.is_relative_to(src) and not path.is_relative_to(source_dir):
            found.setdefault(path.name, path)
    return found


def _with_truth(path: Path, files: dict[str, Path]) -> Item:
    """A source with its truth from ``files``: the true target, mask and µC positions."""
    from PIL import Image

    stem = path.stem
    mask = None
    if f"{stem}_mask.png" in files:
        mask = np.asarray(Image.open(files[f"{stem}_mask.png"])) > 127
    item = _load(path, mask)
    dcm = files.get(path.name)
    if dcm is not None:
        true = _load(dcm, item.mask)
        if true.image.shape == item.image.shape:
            item.truth = true.image
    if f"{stem}.json" in files:
        data = json.loads(files[f"{stem}.json"].read_text(encoding="utf-8"))
        item.calcs = np.asarray(data.get("calcs", []), dtype=np.float64).reshape(-1, 3)
    return item


def split_target(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(bank references, held-out): sorted by name, every ``HELD_OUT_EVERY``-th is held out."""
    ordered = sorted(files, key=lambda p: (p.name, str(p)))
    held = [p for i, p in enumerate(ordered) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return [p for p in ordered if p not in held], held


# -- the run -------------------------------------------------------------------------------------


def run_evaluation(
    config: Any,
    source: Path,
    target: Path,
    out: Path,
    methods: tuple[str, ...],
    *,
    truth: Path | None = None,
    domain_source: Path | None = None,
    refiner: str | None = None,
    fast: str | None = None,
    cyclegan: str | None = None,
    classifier_steps: int = 150,
    command: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """Run every method on every source, score, write metrics.json, run.json, report and figures.

    Args:
        config: the node config (its engine settings set the engine).
        source: source-domain DICOMs, the test set.
        target: target-domain DICOMs: bank references and held-out targets.
        out: the output folder (its ``bank/`` is rebuilt).
        methods: the rows to produce (:data:`METHODS` names, plus :data:`TRAINED`).
        truth: the true target rendering of each source, and the phantom's ground truth.
        domain_source: source-domain DICOMs held apart, for the domain classifier.
        refiner: a trained refiner checkpoint (the :data:`TRAINED` row).
        fast: a fast student checkpoint (the :data:`FAST` row); its teacher must be this
            run's mr2nst method on this run's bank.
        cyclegan: a CycleGAN checkpoint of ``mr2nst train-cyclegan`` (the :data:`CYCLEGAN`
            row), mapped to this run's bank with the config's tone.
        classifier_steps: the domain classifier's training steps.
        command: the command line, for the report.
        progress: show a progress bar.

    Returns:
        ``metrics.json``'s content: per method, each metric's summary or None.

    Raises:
        NodeError: too few sources, references or held-out targets.
    """
    import torch

    from mr2nst.node.lab import report

    sources = _dicoms(source)
    bank, references, held_files = _target_bank(target, out, len(sources))
    runner = Runner(
        config, bank, methods, refiner_path=refiner, fast_path=fast, cyclegan_path=cyclegan
    )
    device = torch.device("cuda" if runner.cuda else "cpu")
    held = [_load(p) for p in held_files]
    domain = [_load(p) for p in _dicoms(domain_source)] if domain_source else []
    ctx, ctx_info = metric_context(config, held, domain, classifier_steps, device)
    truth_files = _truth_files(truth, source, sources) if truth else None
    scores = _Scores.of(methods)
    _score_sources(sources, truth_files, runner, ctx, scores, progress)
    metrics = {name: scores.summary(name) for name in methods}
    run_info = {
        "command": command,
        "sources": len(sources),
        "source_names": scores.names,
        "bank_references": references,
        "held_out_targets": len(held_files),
        "held_out_rule": f"sorted by file name, every {HELD_OUT_EVERY}th file (25 %) held out",
        "domain_source_images": len(domain),
        "truth": bool(truth),
        "engine": {**asdict(runner.core), "grids": list(runner.core.grids)},
        "references": config.methods.references,
        "refiner": refiner or "",
        "fast": runner.fast_info,
        "cyclegan": runner.cyclegan_info,
        "intensity_scale": "[0, 1] over the full BitsStored range, brighter = denser",
        **ctx_info,
        "reference_row": scores.summary(REFERENCE_ROW),
        "paired_tests": scores.paired_tests(methods),
        "per_image": scores.per_image,
    }
    for name, value in (("metrics.json", metrics), ("run.json", run_info)):
        (out / name).write_text(
            json.dumps(report.jsonable(value), indent=1) + "\n", encoding="utf-8"
        )
    report.write_report(out, metrics, run_info, scores.montage)
    return metrics


def _target_bank(target: Path, out: Path, n_sources: int) -> tuple[Any, int, list[Path]]:
    """A fresh bank under ``out/bank`` from ``target``'s references.

    Returns:
        The bank, how many references it took, and the held-out target files.
    """
    from mr2nst.bank.bank import Bank
    from mr2nst.node.errors import NodeError

    bank_files, held_files = split_target(_dicoms(target))
    if not n_sources or not bank_files or not held_files:
        raise NodeError(
            f"evaluate: need sources ({n_sources}), bank references ({len(bank_files)}) "
            f"and held-out targets ({len(held_files)}); "
            f"--target needs at least {HELD_OUT_EVERY} files"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "bank", ignore_errors=True)
    bank = Bank(out / "bank")
    added = bank.add(bank_files)
    if not added.added:
        raise NodeError(f"evaluate: no usable target references ({added.rejected[:1]})")
    return bank, len(added.added), held_files


Montage = list[tuple[Item, dict[str, npt.NDArray[np.float32] | None]]]


@dataclass
class _Scores:
    """Every per-image value by row and metric, the source names and the montage cases."""

    per_image: dict[str, dict[str, list[float | None]]]
    names: list[str] = field(default_factory=list)
    montage: Montage = field(default_factory=list)

    @classmethod
    def of(cls, methods: tuple[str, ...]) -> _Scores:
        return cls({name: {k: [] for k in METRICS} for name in (*methods, REFERENCE_ROW)})

    def add(self, row: str, values: dict[str, float | None]) -> None:
        for k in METRICS:
            self.per_image[row][k].append(values.get(k))

    def summary(self, row: str) -> dict[str, Any]:
        """Each metric's mean, sd and n over the images (None where no value exists)."""
        from mr2nst.core import metrics as m

        return {
            k: (s.as_dict() if (s := m.summary(self.per_image[row][k])) else None) for k in METRICS
        }

    def paired_tests(self, methods: tuple[str, ...]) -> dict[str, Any]:
        """p-values of every method against mr2nst (or the first) and against passthrough."""
        from mr2nst.core import metrics as m

        anchor = "mr2nst" if "mr2nst" in methods else methods[0]
        return {
            anchor_name: {
                name: {
                    k: m.paired_p(self.per_image[name][k], self.per_image[anchor_name][k])
                    for k in IMAGE_METRICS
                }
                for name in methods
                if name != anchor_name
            }
            for anchor_name in dict.fromkeys([anchor, "passthrough"])
            if anchor_name in methods
        }


def _score_sources(
    sources: list[Path],
    truth_files: dict[str, Path] | None,
    runner: Runner,
    ctx: Context,
    scores: _Scores,
    progress: bool,
) -> None:
    """Run and score every method on every source, and the true target as reference row."""
    from tqdm import tqdm

    for path in tqdm(sources, desc="evaluate", unit="image", disable=not progress):
        item = _with_truth(path, truth_files) if truth_files is not None else _load(path)
        scores.names.append(item.name)
        outputs = runner.run(item)
        for name, (image, seconds, mb) in outputs.items():
            values = score(image, item, ctx)
            values["seconds"], values["peak_mb"] = seconds, mb
            scores.add(name, values)
        reference: dict[str, float | None] = (
            score(item.truth, item, ctx) if item.truth is not None else dict.fromkeys(METRICS)
        )
        reference["seconds"] = reference["peak_mb"] = None
        scores.add(REFERENCE_ROW, reference)
        if len(scores.montage) < 2 and item.calcs is not None and len(item.calcs):
            scores.montage.append((item, {n: o[0] for n, o in outputs.items()}))
