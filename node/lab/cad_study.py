"""``mr2nst cad-study``: does normalization help a CAD tuned for UIH? (the paper's Table 2)

The study runs on paired phantoms, whose ground truth gives every mass and µC cluster
(:func:`mr2nst.core.lab.detector.lesions_from_truth`). One small detector
(:mod:`mr2nst.core.lab.detector`, random init) is trained on the UIH training images
only: the "CAD tuned for UIH". Then:

- **Test A** (the product's use): that CAD reads the GE test images as received
  (``passthrough``), after each normalization method, and the true UIH renderings of the
  same breasts (``true_uih``, the upper bound).
- **Test B** (the paper's scheme): detectors trained on UIH only, on UIH plus raw GE
  images, and on UIH plus GE images normalized by each method, at the paper's ratios
  (420 + 420 and 420 + 840: ``ratios`` 1 and 2), all read the UIH test images. Every
  detector gets the same number of optimizer steps, so a bigger training set is not
  also a longer training.

Scoring (:mod:`mr2nst.core.lab.detection_eval`): per lesion type, AP, the recall at 0.5
and 1 false positive per image, the FROC curve, and paired bootstrap intervals (images
resampled) of each row's difference from its baseline (passthrough in Test A, UIH only
in Test B). The bank of the reference methods is built from ``--train`` exactly as
``mr2nst evaluate`` builds one from ``--target`` (its references: all but every 4th
file), so a fast student trained for ``evaluate``'s bank fits here too.

Outputs: ``study.json`` (every number, the splits, seeds and settings), ``report.md``
and ``froc.png``. docs/cad-study.md describes a committed run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mr2nst.node.errors import UsageError

#: Test A's normalization rows (the runner's names), before the optional fast/cyclegan.
TEST_A_METHODS = ("passthrough", "ehm", "mr2nst")
#: Methods this study can run (``spectral`` too: it needs no training).
KNOWN_METHODS = ("passthrough", "ehm", "spectral", "mr2nst", "fast", "cyclegan")
UPPER_BOUND = "true_uih"
BASELINE_B = "uih"
FP_POINTS = (0.5, 1.0)
Image = npt.NDArray[np.float32]


def _usage(message: str) -> UsageError:
    return UsageError(f"cad-study: {message}")


@dataclass(frozen=True)
class StudyInputs:
    """The study's image folders and where their ground truth lies.

    ``truth`` holds ``<name>.json`` for the test images (one phantom set, read as GE and
    as UIH); the training sets' truth defaults to the ``truth`` folder beside them, as
    ``mr2nst phantom`` writes it.
    """

    train: Path
    test_uih: Path
    test_ge: Path
    truth: Path
    train_truth: Path | None = None
    train_ge: Path | None = None
    train_ge_truth: Path | None = None

    def truth_of(self, folder: Path, given: Path | None) -> Path:
        return given if given is not None else folder.parent / "truth"


@dataclass(frozen=True)
class StudySettings:
    """What to run: Test A's methods, Test B's normalizers and ratios, the detector."""

    methods: tuple[str, ...] = TEST_A_METHODS
    test_b: tuple[str, ...] = ("ehm",)
    ratios: tuple[int, ...] = (1, 2)
    epochs: int | None = None  # None: the detector settings' default
    seed: int = 0
    draws: int = 1000
    fast: str | None = None
    cyclegan: str | None = None


@dataclass
class _Set:
    """Images of one set in the common scale, their lesions, and the decoded items."""

    names: list[str] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    lesions: list[list[Any]] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)


def _dicoms(folder: Path, what: str) -> list[Path]:
    from mr2nst.node.lab.evaluate import _dicoms as listed

    if not folder.is_dir():
        raise _usage(f"{what} {folder}: not a directory")
    files = listed(folder)
    if not files:
        raise _usage(f"{what} {folder}: no DICOM files")
    return files


def _read_truth(folder: Path, name: str, what: str) -> dict[str, Any]:
    path = folder / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _usage(f"{what}: no ground truth {path} (phantom sets have truth/)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _usage(f"{what}: unreadable ground truth {path} ({exc})") from None
    if not isinstance(data, dict):
        raise _usage(f"{what}: ground truth {path} is not a JSON object")
    return data


def _load_set(files: Sequence[Path], truth: Path, what: str) -> _Set:
    """Decode ``files`` and read their lesions from ``truth``."""
    from mr2nst.core.lab.detector import lesions_from_truth
    from mr2nst.node.lab.evaluate import _load

    if not truth.is_dir():
        raise _usage(f"{what}: ground truth folder {truth} is not a directory")
    out = _Set()
    for path in files:
        data = _read_truth(truth, path.stem, what)
        try:
            item = _load(path)
        except Exception as exc:  # edge: any unreadable or unsupported DICOM
            raise _usage(f"{what} {path}: not a usable image ({exc})") from None
        try:
            lesions = lesions_from_truth(path.stem, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise _usage(f"{what}: bad ground truth {truth / path.stem}.json ({exc})") from None
        out.names.append(path.stem)
        out.images.append(item.image)
        out.lesions.append(lesions)
        out.items.append(item)
    return out


def _emitter(enabled: bool) -> Callable[[dict[str, Any]], None]:
    def emit(event: dict[str, Any]) -> None:
        if enabled:
            print(json.dumps(event), file=sys.stderr, flush=True)

    return emit


def run_cad_study(
    config: Any,
    inputs: StudyInputs,
    settings: StudySettings,
    out: Path,
    *,
    command: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the study, write ``study.json``, ``report.md`` and ``froc.png`` under ``out``.

    Returns:
        ``study.json``'s content.

    Raises:
        UsageError: an input folder, image or ground truth is missing or unusable, an
            unknown method, or test sets that do not pair up by file name.
        ConfigError: a fast or CycleGAN checkpoint that does not fit.
    """
    from mr2nst.core.lab.detector import DetectorConfig, DetectorSettings
    from mr2nst.node.lab.evaluate import _target_bank
    from mr2nst.node.lab.runner import Runner

    started = time.perf_counter()
    emit = _emitter(progress)
    _check_settings(settings)
    train_files = _dicoms(inputs.train, "--train")
    if len(train_files) < 4:
        raise _usage(f"--train {inputs.train}: needs at least 4 images (3/4 form the bank)")
    uih_files = _dicoms(inputs.test_uih, "--test-uih")
    ge_files = _dicoms(inputs.test_ge, "--test-ge")
    if [p.name for p in uih_files] != [p.name for p in ge_files]:
        raise _usage("--test-uih and --test-ge must hold the same file names (paired renderings)")
    ge_train_files: list[Path] = []
    if inputs.train_ge is not None:
        ge_train_files = _dicoms(inputs.train_ge, "--train-ge")
    train = _load_set(train_files, inputs.truth_of(inputs.train, inputs.train_truth), "--train")
    test_uih = _load_set(uih_files, inputs.truth, "--test-uih")
    test_ge = _load_set(ge_files, inputs.truth, "--test-ge")
    n_base = len(train.names)
    wanted_ge = n_base * max(settings.ratios) if settings.test_b else 0
    ge_train = _Set()
    if ge_train_files and wanted_ge:
        assert inputs.train_ge is not None
        ge_train = _load_set(
            ge_train_files[:wanted_ge],
            inputs.truth_of(inputs.train_ge, inputs.train_ge_truth),
            "--train-ge",
        )
    timing: dict[str, float] = {"load": time.perf_counter() - started}
    emit({"event": "loaded", "train": n_base, "test": len(test_uih.names)})

    out.mkdir(parents=True, exist_ok=True)
    bank, bank_references, _ = _target_bank(inputs.train, out, len(ge_files))
    # Test A shows every method that Test B uses too.
    runner_methods = tuple(dict.fromkeys((*settings.methods, *settings.test_b)))
    runner = Runner(
        config, bank, runner_methods, fast_path=settings.fast, cyclegan_path=settings.cyclegan
    )
    device = "cuda" if runner.cuda else "cpu"

    # Test A's inputs: every method's output on every GE test image.
    t = time.perf_counter()
    outputs: dict[str, list[Image]] = {m: [] for m in runner_methods}
    seconds: dict[str, list[float]] = {m: [] for m in runner_methods}
    methods = {name: _method_of(runner, name) for name in runner_methods}
    for n, item in enumerate(test_ge.items):
        for name, method in methods.items():
            t0 = time.perf_counter()
            outputs[name].append(method(item.image, item.info).image)
            seconds[name].append(time.perf_counter() - t0)
        emit({"event": "normalized", "image": n + 1, "of": len(test_ge.items)})
    timing["normalize_test"] = time.perf_counter() - t

    # Test B's training sets: GE training images, raw and normalized.
    t = time.perf_counter()
    ge_versions: dict[str, list[Image]] = {}
    if settings.test_b and ge_train.names:
        ge_versions["raw"] = list(ge_train.images)
        for name in settings.test_b:
            fn = methods[name]
            ge_versions[name] = [fn(item.image, item.info).image for item in ge_train.items]
            emit({"event": "normalized_train_ge", "method": name, "images": len(ge_train.items)})
    timing["normalize_train_ge"] = time.perf_counter() - t

    detector_config = DetectorConfig()
    base_settings = DetectorSettings()
    epochs = settings.epochs or base_settings.epochs
    steps_images = epochs * n_base  # every detector sees this many training images
    trained: dict[str, dict[str, Any]] = {}

    def fit(row: str, images: list[Image], lesions: list[list[Any]], names: list[str]) -> Any:
        from mr2nst.core.lab.detector import Sample, train_detector

        t0 = time.perf_counter()
        row_epochs = max(1, round(steps_images / len(images)))
        samples = [Sample(n, img, les) for n, img, les in zip(names, images, lesions, strict=True)]
        det_settings = replace(base_settings, epochs=row_epochs, seed=settings.seed)
        detector, losses = train_detector(
            samples,
            detector_config,
            det_settings,
            device=device,
            progress=lambda e, loss: emit(
                {"event": "detector_epoch", "row": row, "epoch": e, "loss": round(loss, 5)}
            ),
        )
        trained[row] = {
            "images": len(images),
            "epochs": row_epochs,
            "losses": [round(x, 5) for x in losses],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        return detector

    # The CAD tuned for UIH: Test A's detector and Test B's baseline row.
    cad = fit(BASELINE_B, train.images, train.lesions, train.names)
    test_a_inputs = {**outputs, UPPER_BOUND: test_uih.images}
    lesions = [x for per in test_uih.lesions for x in per]
    test_a = {
        row: _score(cad, images, test_uih.names, lesions, device)
        for row, images in test_a_inputs.items()
    }
    _compare(test_a, "passthrough" if "passthrough" in test_a else None, test_uih.names, settings)

    test_b: dict[str, Any] = {
        BASELINE_B: _score(cad, test_uih.images, test_uih.names, lesions, device)
    }
    counts: dict[str, dict[str, int]] = {BASELINE_B: {"uih": n_base, "ge": 0}}
    for version, ge_images in ge_versions.items():
        for ratio in settings.ratios:
            take = min(len(ge_images), n_base * ratio)
            if take == 0:
                continue
            row = f"uih+ge_{version}_x{ratio}"
            detector = fit(
                row,
                [*train.images, *ge_images[:take]],
                [*train.lesions, *ge_train.lesions[:take]],
                [*train.names, *(f"ge:{n}" for n in ge_train.names[:take])],
            )
            test_b[row] = _score(detector, test_uih.images, test_uih.names, lesions, device)
            counts[row] = {"uih": n_base, "ge": take}
    _compare(test_b, BASELINE_B, test_uih.names, settings)
    timing["total"] = time.perf_counter() - started

    study = {
        "command": command,
        "seconds": round(timing["total"], 1),
        "timing_s": {k: round(v, 1) for k, v in timing.items()},
        "device": device,
        "seed": settings.seed,
        "bootstrap": {"draws": settings.draws, "level": 0.95, "resampled": "test images"},
        "splits": {
            "train_uih": train.names,
            "train_uih_dir": str(inputs.train),
            "bank_references": bank_references,
            "train_ge": ge_train.names,
            "train_ge_dir": str(inputs.train_ge) if inputs.train_ge else None,
            "test": test_uih.names,
            "test_uih_dir": str(inputs.test_uih),
            "test_ge_dir": str(inputs.test_ge),
            "lesions": {
                kind: sum(1 for x in lesions if x.kind == kind) for kind in ("mass", "calc")
            },
        },
        "detector": {
            "config": detector_config.as_dict(),
            "settings": {**base_settings.as_dict(), "epochs": epochs, "seed": settings.seed},
            "training_images_per_detector": steps_images,
            "trained": trained,
        },
        "methods": {
            name: {"seconds_per_image": round(float(np.mean(s)), 3) if s else None}
            for name, s in seconds.items()
        },
        "fast": runner.fast_info,
        "cyclegan": runner.cyclegan_info,
        "test_b_counts": counts,
        "test_a": _without_curves(test_a),
        "test_b": _without_curves(test_b),
        "froc": {
            "test_a": {row: v["curves"] for row, v in test_a.items()},
            "test_b": {row: v["curves"] for row, v in test_b.items()},
        },
    }
    _write(out, study)
    return study


def _check_settings(settings: StudySettings) -> None:
    unknown = [m for m in settings.methods if m not in KNOWN_METHODS]
    unknown += [m for m in settings.test_b if m not in KNOWN_METHODS or m == "passthrough"]
    if unknown:
        raise _usage(
            f"unknown method(s) {unknown}; choose from {','.join(KNOWN_METHODS)} "
            "(Test B: not passthrough, its raw GE rows are always there)"
        )
    for name, path in (("fast", settings.fast), ("cyclegan", settings.cyclegan)):
        used = name in settings.methods or name in settings.test_b
        if used and not path:
            raise _usage(f"method {name} needs --{name} PATH")
        if path and not Path(path).is_file():
            raise _usage(f"--{name} {path}: no such file")
    if not settings.ratios or any(r < 1 for r in settings.ratios):
        raise _usage(f"ratios must be positive integers, got {settings.ratios}")
    if settings.epochs is not None and settings.epochs < 1:
        raise _usage(f"--epochs must be >= 1, got {settings.epochs}")
    if settings.draws < 10:
        raise _usage(f"--draws must be >= 10, got {settings.draws}")


def _method_of(runner: Any, name: str) -> Callable[..., Any]:
    """The runner's method object ``name`` (built only for the names it was given)."""
    if name == "passthrough":
        from mr2nst.core.method import Passthrough

        return Passthrough("study")
    method = {
        "ehm": runner.ehm,
        "spectral": runner.spectral,
        "mr2nst": runner.mr2nst,
        "fast": runner.fast,
        "cyclegan": runner.cyclegan,
    }.get(name)
    if method is None:
        raise _usage(f"Test B method {name} is not available in this run")
    fn: Callable[..., Any] = method
    return fn


def _score(
    detector: Any, images: Sequence[Image], names: Sequence[str], lesions: list[Any], device: str
) -> dict[str, Any]:
    """One row: the detector's detections on ``images``, scored per lesion type."""
    from mr2nst.core.lab.detection_eval import ap_of_hits, froc_of_hits, per_image, pooled
    from mr2nst.core.lab.detector import detect

    detections = [
        d
        for image, name in zip(images, names, strict=True)
        for d in detect(detector, image, name, device=device)
    ]
    row: dict[str, Any] = {"curves": {}, "hits": {}}
    for kind in ("mass", "calc"):
        mine = [x for x in lesions if x.kind == kind]
        dets = [d for d in detections if d.kind == kind]
        by_image = per_image(dets, mine, names)
        hits, n_lesions = pooled(names, by_image)
        curve = froc_of_hits(hits, n_lesions, len(names))
        row[kind] = {
            "ap": round(ap_of_hits(hits, n_lesions), 4),
            "recall_at_0.5fp": round(curve.recall_at(0.5), 4),
            "recall_at_1fp": round(curve.recall_at(1.0), 4),
            "lesions": n_lesions,
            "detections": len(dets),
        }
        keep = curve.fp_per_image <= 4.0
        row["curves"][kind] = {
            "fp_per_image": [round(float(v), 4) for v in curve.fp_per_image[keep]],
            "sensitivity": [round(float(v), 4) for v in curve.sensitivity[keep]],
        }
        row["hits"][kind] = by_image
    return row


def _compare(
    rows: dict[str, Any], baseline: str | None, names: Sequence[str], settings: StudySettings
) -> None:
    """Paired bootstrap of AP and recall at 1 FP/image: each row minus ``baseline``."""
    from mr2nst.core.lab.detection_eval import ap_of_hits, froc_of_hits, paired_bootstrap, pooled

    if baseline is None:
        return

    def metric(by_image: Any, which: str) -> Callable[[Sequence[str]], float]:
        def value(sample: Sequence[str]) -> float:
            hits, n = pooled(sample, by_image)
            if which == "ap":
                return ap_of_hits(hits, n)
            return froc_of_hits(hits, n, len(sample)).recall_at(1.0)

        return value

    for row, values in rows.items():
        if row == baseline:
            continue
        for kind in ("mass", "calc"):
            values[kind]["vs_" + baseline] = {
                which: {
                    k: round(v, 4)
                    for k, v in paired_bootstrap(
                        metric(values["hits"][kind], which),
                        metric(rows[baseline]["hits"][kind], which),
                        list(names),
                        draws=settings.draws,
                        seed=settings.seed,
                    ).items()
                }
                for which in ("ap", "recall_at_1fp")
            }


def _without_curves(rows: dict[str, Any]) -> dict[str, Any]:
    return {
        row: {k: v for k, v in values.items() if k not in ("curves", "hits")}
        for row, values in rows.items()
    }


# -- outputs ------------------------------------------------------------------------------------


def _write(out: Path, study: dict[str, Any]) -> None:
    (out / "study.json").write_text(json.dumps(study, indent=1) + "\n", encoding="utf-8")
    _froc_png(out / "froc.png", study["froc"])
    (out / "report.md").write_text(report_md(study), encoding="utf-8")


def _froc_png(path: Path, curves: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8), sharex=True, sharey=True)
    titles = {"test_a": "Test A: UIH CAD on GE test images", "test_b": "Test B: on UIH test images"}
    for r, test in enumerate(("test_a", "test_b")):
        for c, kind in enumerate(("mass", "calc")):
            ax = axes[r][c]
            for row, per_kind in curves[test].items():
                curve = per_kind[kind]
                ax.step(curve["fp_per_image"], curve["sensitivity"], where="post", label=row)
            ax.set_title(f"{titles[test]}: {'masses' if kind == 'mass' else 'µC clusters'}")
            ax.set_xlim(0, 4)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if r == 1:
                ax.set_xlabel("false positives per image")
            if c == 0:
                ax.set_ylabel("sensitivity")
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(values: dict[str, Any], metric: str, baseline: str | None) -> str:
    text = f"{values[metric]:.3f}"
    key = f"vs_{baseline}" if baseline else ""
    if baseline and key in values and metric in values[key]:
        d = values[key][metric]
        text += f" ({d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}])"
    return text


def _table(rows: dict[str, Any], baseline: str | None, extra: Callable[[str], str]) -> list[str]:
    lines = [
        "| row | train | mass AP | mass R@0.5 | mass R@1 | µC AP | µC R@0.5 | µC R@1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, values in rows.items():
        cells = []
        for kind in ("mass", "calc"):
            v = values[kind]
            cells += [
                _cell(v, "ap", baseline),
                f"{v['recall_at_0.5fp']:.3f}",
                _cell(v, "recall_at_1fp", baseline),
            ]
        lines.append(f"| {row} | {extra(row)} | " + " | ".join(cells) + " |")
    return lines


def report_md(study: dict[str, Any]) -> str:
    """The study's report: both tables, the settings, the time it took."""
    splits, det = study["splits"], study["detector"]
    counts = study["test_b_counts"]
    lesions = splits["lesions"]
    lines = [
        "# CAD study: a detector tuned for UIH, on GE images before and after normalization",
        "",
        f"Command: `{study['command']}`" if study["command"] else "",
        "",
        f"Took **{study['seconds'] / 60:.1f} min** on {study['device']} "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in study['timing_s'].items())}).",
        "",
        f"Detector trained on {len(splits['train_uih'])} UIH images; tested on "
        f"{len(splits['test'])} paired test cases holding {lesions['mass']} masses and "
        f"{lesions['calc']} µC clusters. Each detector saw {det['training_images_per_detector']} "
        "training images (the same number of steps for every training set).",
        "",
        "Cells: value, and in brackets the difference from the baseline row with its 95 % "
        f"paired bootstrap interval ({study['bootstrap']['draws']} resamples of the test "
        "images). R@x: recall (sensitivity) at x false positives per image.",
        "",
        "## Test A: the UIH-tuned CAD on GE test images (baseline: passthrough)",
        "",
        *_table(study["test_a"], "passthrough", lambda row: "UIH"),
        "",
        "`true_uih`: the same breasts rendered by the UIH model, the upper bound.",
        "",
        "## Test B: training sets, tested on the UIH test images (baseline: uih)",
        "",
        *_table(
            study["test_b"],
            BASELINE_B,
            lambda row: f"{counts[row]['uih']} UIH + {counts[row]['ge']} GE",
        ),
        "",
        "Rows `uih+ge_<version>_x<r>`: the UIH training images plus r times as many GE "
        "training images, raw or normalized by that method.",
        "",
        "![FROC](froc.png)",
        "",
        "## Per-method normalization time (s/image, Test A)",
        "",
        *(
            f"- {name}: {v['seconds_per_image']}"
            for name, v in study["methods"].items()
            if v["seconds_per_image"] is not None
        ),
        "",
    ]
    return "\n".join(lines)
