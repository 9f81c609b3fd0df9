"""``mr2nst evaluate``: does the normalization work? Metrics, paired tests, report, figures.

    mr2nst evaluate --source DIR --target DIR [--truth DIR] --out DIR [--methods a,b,...]
                    [--config FILE] [--refiner PATH] [--domain-source DIR]

- ``--source``: source-domain (GE) DICOMs, the test set.
- ``--target``: target-domain (UIH) DICOMs. Sorted by file name, every 4th file (index
  3, 7, 11, ...) is *held out* (25 %) and the rest go into a fresh bank under
  ``OUT/bank`` that the methods take their references from. Held-out images are the
  style targets of the Gram and histogram distances and the target class of the domain
  classifier; no method ever sees them.
- ``--truth``: the true target rendering of each source, matched by file name anywhere
  under DIR (files under ``--source`` itself are skipped), plus the phantom's ground
  truth ``NAME.json`` (µC positions) and ``NAME_mask.png`` (breast mask) when present.
- ``--domain-source``: source-domain DICOMs held apart from ``--source``: the source class
  of the domain classifier. Without it the classifier is not trained and
  ``domain_target_fraction`` is null.

**Common intensity scale.** Every image (outputs, true targets, held-out targets) is
compared as the float image the node would write, i.e. [0, 1] over the full range of its
BitsStored, MONOCHROME1 inverted (brighter = denser): :func:`~mr2nst.bank.dicom_image.decode`
for DICOM inputs, ``MethodResult.image`` for outputs (which are expressed in the range
they would be written with: the source's for passthrough, the bank's for the others).

Methods: ``passthrough``, ``ehm``, ``spectral`` (EHM plus the references' texture
spectrum, :mod:`.method_spectral`), ``nst_single`` (grids (1,), one reference),
``mr2nst_1ref`` (all grids, one reference), ``mr2nst`` (``engine.references``), and
``mr2nst_s0/s1/s2``: the stitched scales of that same ``mr2nst`` run (not rerun), mapped
to the target range like the merged output. ``--refiner`` adds ``mr2nst_trained``: what
the refiner mixes in that run (the scales, or their bands) merged by the trained refiner,
then finished like the merged output (detail mode, tone). Report and figures:
:mod:`.evaluate_report`.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

METHODS = (
    "passthrough",
    "ehm",
    "spectral",
    "nst_single",
    "mr2nst_1ref",
    "mr2nst",
    "mr2nst_s0",
    "mr2nst_s1",
    "mr2nst_s2",
)
TRAINED = "mr2nst_trained"
METRICS = (
    "style_gram",
    "hist_w1",
    "ssim",
    "psnr",
    "uc_cnr_ratio",
    "uc_detected",
    "spectrum_dist",
    "sharpness_ratio",
    "structure_ssim",
    "domain_target_fraction",
    "seconds",
    "peak_mb",
)
HELD_OUT_EVERY = 4  # every 4th target file (by name) is held out: 25 %
W1_POOL = 200_000  # held-out target pixels pooled for the histogram distance (seeded subsample)
REFERENCE_ROW = "true_target"


def parse_methods(text: str | None, error: Callable[[str], Exception]) -> tuple[str, ...]:
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


@dataclass
class Item:
    """A decoded image in the common scale, with its mask and (for sources) ground truth."""

    name: str
    path: Path
    image: npt.NDArray[np.float32]
    mask: npt.NDArray[np.bool_]
    info: Any
    truth: npt.NDArray[np.float32] | None = None
    calcs: npt.NDArray[np.float64] | None = None


def _dicoms(folder: Path) -> list[Path]:
    from mr2nst.bank.bank import iter_files

    return sorted(iter_files([folder]), key=lambda p: (p.name, str(p)))


def _load(path: Path, mask: npt.NDArray[np.bool_] | None = None) -> Item:
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


# -- cost ----------------------------------------------------------------------------------------


class _Peak:
    """Peak memory of a block: CUDA peak allocation, or the CPU process's RSS rise (sampled)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> _Peak:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        proc = psutil.Process()
        base = proc.memory_info().rss
        self._peak = base

        def sample() -> None:
            while not self._stop.wait(0.01):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._base = base
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
        import psutil

        self._peak = max(self._peak, psutil.Process().memory_info().rss)
        self.mb = (self._peak - self._base) / 2**20


# -- the methods ----------------------------------------------------------------------------------


class _Recorder:
    """Wraps an engine for :class:`~mr2nst.node.methods.mr2nst.Mr2nstMethod`, keeping the last
    :class:`EngineResult` and mask, so the per-scale images of the same run can be scored."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.last: Any = None
        self.mask: npt.NDArray[np.bool_] | None = None

    @property
    def config(self) -> Any:
        return self.engine.config

    @property
    def weights_id(self) -> str:
        return str(self.engine.weights_id)

    def fingerprint(self) -> str:
        return str(self.engine.fingerprint())

    def transfer(self, content: Any, content_mask: Any, references: Any, **kwargs: Any) -> Any:
        self.last = self.engine.transfer(content, content_mask, references, **kwargs)
        self.mask = content_mask
        return self.last


@dataclass
class Runner:
    """Builds the methods once and produces every method's output for one source."""

    config: Any
    bank: Any
    methods: tuple[str, ...]
    refiner_path: str | None = None
    cuda: bool = False
    engines: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from mr2nst.core.engine import Mr2nstEngine, resolved_device
        from mr2nst.core.refiner import load_refiner
        from mr2nst.node.methods.ehm import EhmMethod
        from mr2nst.node.methods.mr2nst import Mr2nstMethod
        from mr2nst.node.methods.spectral import SpectralMethod
        from mr2nst.node.methods.weights import ensure_weights
        from mr2nst.node.version import VERSION

        core = replace(self.config.engine.core(), weights=ensure_weights(self.config.engine) or "")
        self.core = core
        self.cuda = resolved_device(core).type == "cuda"
        k = self.config.engine.references
        want = set(self.methods)
        self.ehm = EhmMethod(self.bank, k, True, VERSION)
        self.spectral = SpectralMethod(self.bank, k, True, VERSION, self.config.spectral.core())
        full = (
            _Recorder(Mr2nstEngine(core))
            if want - {"passthrough", "ehm", "spectral", "nst_single"}
            else None
        )
        single = (
            _Recorder(Mr2nstEngine(replace(core, grids=(1,)))) if "nst_single" in want else None
        )
        self.full, self.single = full, single
        self.mr2nst = Mr2nstMethod(full, self.bank, k, True, VERSION) if full else None
        if self.mr2nst is not None:
            self.mr2nst.keep_last = True  # the trained row re-finishes the same run
        self.one_ref = Mr2nstMethod(full, self.bank, 1, True, VERSION) if full else None
        self.nst_single = Mr2nstMethod(single, self.bank, 1, True, VERSION) if single else None
        self.refiner = None
        if self.refiner_path and full is not None:
            self.refiner = load_refiner(self.refiner_path, full.engine.refiner_expectation()).eval()

    def _timed(self, fn: Callable[[], Any]) -> tuple[Any, float, float]:
        with _Peak(self.cuda) as peak:
            started = time.perf_counter()
            value = fn()
            seconds = time.perf_counter() - started
        return value, seconds, peak.mb

    def _to_target(
        self, image: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_]
    ) -> npt.NDArray[np.float32]:
        """Engine [0, 1] image -> the bank's range, as Mr2nstMethod maps its merged output."""
        stats = self.bank.stats()
        out = stats.low + np.clip(image, 0.0, 1.0) * np.float32(stats.high - stats.low)
        out[~mask] = np.float32(stats.background)
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def run(
        self, item: Item
    ) -> dict[str, tuple[npt.NDArray[np.float32] | None, float | None, float | None]]:
        """``{method: (output in the common scale, seconds, peak MB)}``.

        None where not computable.
        """
        want = set(self.methods)
        out: dict[str, tuple[npt.NDArray[np.float32] | None, float | None, float | None]] = {}
        calls: list[tuple[str, Any]] = [("passthrough", lambda: item.image.copy())]
        calls.append(("ehm", lambda: self.ehm(item.image, item.info).image))
        calls.append(("spectral", lambda: self.spectral(item.image, item.info).image))
        if self.nst_single is not None:
            calls.append(("nst_single", lambda: self.nst_single(item.image, item.info).image))
        if self.one_ref is not None and "mr2nst_1ref" in want:
            calls.append(("mr2nst_1ref", lambda: self.one_ref(item.image, item.info).image))
        if self.mr2nst is not None:
            calls.append(("mr2nst", lambda: self.mr2nst(item.image, item.info).image))
        for name, fn in calls:
            if name in want or name == "mr2nst":
                out[name] = self._timed(fn)
        if self.full is not None and self.full.last is not None:
            result, mask = self.full.last, self.full.mask
            for k in range(3):
                image = self._to_target(result.scales[k], mask) if k < len(result.scales) else None
                out[f"mr2nst_s{k}"] = (image, None, None)
            if self.refiner is not None:

                def trained() -> npt.NDArray[np.float32]:
                    assert self.mr2nst is not None and self.mr2nst.last is not None
                    prepared, _ = self.mr2nst.last
                    unit = self.full.engine.merge(
                        result.merge_inputs, prepared.start, mask, 0.0, self.refiner
                    )
                    return self.mr2nst.finish(unit, prepared, result).image

                image, seconds, mb = self._timed(trained)
                base = out["mr2nst"]
                out[TRAINED] = (
                    image,
                    None if base[1] is None else base[1] + seconds,
                    None if base[2] is None else max(base[2], mb),
                )
        return {name: out.get(name, (None, None, None)) for name in self.methods}


# -- metrics per image -----------------------------------------------------------------------------


@dataclass
class Context:
    """Everything the per-image metrics compare against."""

    features: Any
    target_gram: dict[str, Any]
    target_pool: npt.NDArray[np.float32]
    target_spectrum: npt.NDArray[np.float64] | None = None
    classifier: Any = None


def score(
    image: npt.NDArray[np.float32] | None, item: Item, ctx: Context
) -> dict[str, float | None]:
    """All image metrics of one output (None where not computable)."""
    from mr2nst.core import metrics as m

    values: dict[str, float | None] = dict.fromkeys(METRICS[:-2])
    if image is None:
        return values
    grams = m.masked_grams(ctx.features, image, item.mask)
    values["style_gram"] = None if grams is None else m.gram_distance(grams, ctx.target_gram)
    values["hist_w1"] = m.hist_w1(image, item.mask, ctx.target_pool)
    if ctx.target_spectrum is not None:
        values["spectrum_dist"] = m.spectrum_dist(image, item.mask, ctx.target_spectrum)
    if item.truth is not None:
        values["ssim"] = m.masked_ssim(image, item.truth, item.mask)
        values["psnr"] = m.masked_psnr(image, item.truth, item.mask)
        values["sharpness_ratio"] = m.sharpness_ratio(image, item.truth, item.mask)
        values["structure_ssim"] = m.structure_ssim(image, item.truth, item.mask)
        if item.calcs is not None:
            values["uc_cnr_ratio"] = m.uc_cnr_ratio(image, item.truth, item.calcs)
    if item.calcs is not None:
        values["uc_detected"] = m.uc_detected(image, item.mask, item.calcs)
    if ctx.classifier is not None:
        values["domain_target_fraction"] = float(ctx.classifier.is_target(image, item.mask))
    return values


def _context(
    config: Any, held: list[Item], domain_source: list[Item], steps: int, device: Any
) -> tuple[Context, dict[str, Any]]:
    from mr2nst.core import metrics as m
    from mr2nst.core.features import build_features
    from mr2nst.core.lab.domain_classifier import ClassifierSettings, DomainClassifier

    # Never score an engine with the network it optimised (core.metrics.metric_network).
    # The metric's hed-vgg16 is always the installed package's file: engine.weights names
    # the engine's own network.
    source, seed = m.metric_network(config.engine.features, config.engine.seed)
    features = build_features(source, "max", "", seed).to(device)
    grams = [g for g in (m.masked_grams(features, h.image, h.mask) for h in held) if g is not None]
    spectra = [s for s in (m.radial_spectrum(h.image, h.mask) for h in held) if s is not None]
    pool = np.concatenate([h.image[h.mask] for h in held])
    if pool.size > W1_POOL:
        pool = np.random.default_rng(0).choice(pool, W1_POOL, replace=False)
    info: dict[str, Any] = {"metric_features": features.weights_id + ", max pooling"}
    classifier = None
    if domain_source:
        settings = ClassifierSettings(steps=steps)
        classifier = DomainClassifier.train(
            [(d.image, d.mask) for d in domain_source], [(h.image, h.mask) for h in held], settings
        )
        info["classifier"] = {
            **asdict(settings),
            "train_accuracy_last_10_batches": classifier.train_accuracy,
            "source_images": len(domain_source),
            "target_images": len(held),
        }
    return Context(
        features,
        m.mean_grams(grams),
        pool.astype(np.float32),
        m.mean_spectrum(spectra) if spectra else None,
        classifier,
    ), info


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
    classifier_steps: int = 150,
    command: str = "",
    progress: bool = False,
) -> dict[str, Any]:
    """Run every method on every source, score, write metrics.json, run.json, report and figures."""
    from tqdm import tqdm

    from mr2nst.bank.bank import Bank
    from mr2nst.core import metrics as m
    from mr2nst.node.errors import NodeError
    from mr2nst.node.lab import report

    sources, targets = _dicoms(source), _dicoms(target)
    bank_files, held_files = split_target(targets)
    if not sources or not bank_files or not held_files:
        raise NodeError(
            f"evaluate: need sources ({len(sources)}), bank references ({len(bank_files)}) "
            f"and held-out targets ({len(held_files)}); "
            f"--target needs at least {HELD_OUT_EVERY} files"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "bank", ignore_errors=True)
    bank = Bank(out / "bank")
    added = bank.add(bank_files)
    if not added.added:
        raise NodeError(f"evaluate: no usable target references ({added.rejected[:1]})")
    runner = Runner(config, bank, methods, refiner_path=refiner)
    import torch

    device = torch.device("cuda" if runner.cuda else "cpu")
    held = [_load(p) for p in held_files]
    domain = [_load(p) for p in _dicoms(domain_source)] if domain_source else []
    ctx, ctx_info = _context(config, held, domain, classifier_steps, device)
    truth_files = _truth_files(truth, source, sources) if truth else {}

    per_image: dict[str, dict[str, list[float | None]]] = {
        name: {k: [] for k in METRICS} for name in (*methods, REFERENCE_ROW)
    }
    names: list[str] = []
    montage: list[tuple[Item, dict[str, npt.NDArray[np.float32] | None]]] = []
    for path in tqdm(sources, desc="evaluate", unit="image", disable=not progress):
        item = _with_truth(path, truth_files) if truth else _load(path)
        names.append(item.name)
        outputs = runner.run(item)
        for name, (image, seconds, mb) in outputs.items():
            values = score(image, item, ctx)
            values["seconds"], values["peak_mb"] = seconds, mb
            for k in METRICS:
                per_image[name][k].append(values[k])
        ref_values = (
            score(item.truth, item, ctx) if item.truth is not None else dict.fromkeys(METRICS)
        )
        ref_values["seconds"] = ref_values["peak_mb"] = None
        for k in METRICS:
            per_image[REFERENCE_ROW][k].append(ref_values.get(k))
        if len(montage) < 2 and item.calcs is not None and len(item.calcs):
            montage.append((item, {n: o[0] for n, o in outputs.items()}))

    def summarise(name: str) -> dict[str, Any]:
        return {k: (s.as_dict() if (s := m.summary(per_image[name][k])) else None) for k in METRICS}

    metrics = {name: summarise(name) for name in methods}
    anchor = "mr2nst" if "mr2nst" in methods else methods[0]
    tests = {
        anchor_name: {
            name: {
                k: m.paired_p(per_image[name][k], per_image[anchor_name][k]) for k in METRICS[:-2]
            }
            for name in methods
            if name != anchor_name
        }
        for anchor_name in dict.fromkeys([anchor, "passthrough"])
        if anchor_name in methods
    }
    run_info = {
        "command": command,
        "sources": len(sources),
        "source_names": names,
        "bank_references": len(added.added),
        "held_out_targets": len(held_files),
        "held_out_rule": f"sorted by file name, every {HELD_OUT_EVERY}th file (25 %) held out",
        "domain_source_images": len(domain),
        "truth": bool(truth),
        "engine": {**asdict(runner.core), "grids": list(runner.core.grids)},
        "references": config.engine.references,
        "refiner": refiner or "",
        "intensity_scale": "[0, 1] over the full BitsStored range, brighter = denser",
        **ctx_info,
        "reference_row": summarise(REFERENCE_ROW),
        "paired_tests": tests,
        "per_image": per_image,
    }
    (out / "metrics.json").write_text(
        json.dumps(report.jsonable(metrics), indent=1) + "\n", encoding="utf-8"
    )
    (out / "run.json").write_text(
        json.dumps(report.jsonable(run_info), indent=1) + "\n", encoding="utf-8"
    )
    report.write_report(out, metrics, run_info, montage)
    return metrics
