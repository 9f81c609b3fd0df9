"""The evaluation's report: ``report.md`` (tables), ``metrics.png`` (distributions) and
``montage.png`` (before/after with zoomed µC regions). matplotlib with the Agg backend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

LABELS = {
    "style_gram": ("Gram dist ↓", "relative Frobenius distance of masked Gram matrices at relu1_1..relu5_1 "
                   "to the mean Gram of the held-out target images"),
    "hist_w1": ("W1 hist ↓", "Wasserstein-1 distance of breast pixel values to the pooled held-out "
                "target breast pixels"),
    "ssim": ("SSIM ↑", "SSIM map (skimage) averaged inside the breast mask, against the true target rendering"),
    "psnr": ("PSNR dB ↑", "PSNR of the breast pixels against the true target rendering"),
    "uc_cnr_ratio": ("µC CNR ratio →1", "mean µC contrast-to-noise ratio (disk vs annulus 2-5 px out) "
                     "of the output over that of the true target rendering"),
    "uc_detected": ("µC detected ↑", "fraction of known µCs found by a fixed white top-hat spot "
                    "detector (disk r=4 px, 4 robust sigmas, match within 2 px)"),
    "domain_target_fraction": ("called target ↑", "fraction of outputs the ResNet18 domain classifier "
                               "calls target-domain (stands in for the paper's NIMA score)"),
    "seconds": ("s/image", "wall time per image of the method call"),
    "peak_mb": ("peak MB", "peak memory per image: CUDA peak allocation on a GPU, rise of the "
                "process's resident memory over the call on the CPU (sampled every 10 ms)"),
}
DESCRIPTIONS = {
    "passthrough": "source image unchanged (the GE rendering)",
    "ehm": "exact histogram matching to the selected references",
    "nst_single": "single-reference, single-scale NST (grid 1 only)",
    "mr2nst_1ref": "mr2NST, all scales, 1 reference",
    "mr2nst": "mr2NST, all scales, engine.references references, untrained refiner (average)",
    "mr2nst_s0": "scale 0 of the mr2nst run alone",
    "mr2nst_s1": "scale 1 of the mr2nst run alone",
    "mr2nst_s2": "scale 2 of the mr2nst run alone",
    "mr2nst_trained": "the same scales merged by the trained refiner",
    "true_target": "(reference) the true target rendering itself",
}


def jsonable(value: Any) -> Any:
    """Non-finite floats (an identical image's PSNR) become null: JSON has no infinity."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return value


def _cell(summary: dict[str, Any] | None, metric: str) -> str:
    if summary is None:
        return "—"
    digits = 1 if metric in ("psnr", "peak_mb") else 2 if metric == "seconds" else 3
    return f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f}"


def _p(value: float | None) -> str:
    return "—" if value is None else f"{value:.2g}"


def table(metrics: dict[str, dict[str, Any]], reference: dict[str, Any] | None) -> list[str]:
    """The Markdown results table, one row per method (plus the true-target reference row)."""
    keys = list(LABELS)
    lines = ["| method | n | " + " | ".join(LABELS[k][0] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    rows = list(metrics.items()) + ([("true_target", reference)] if reference else [])
    for name, values in rows:
        n = max((v["n"] for v in values.values() if v), default=0)
        lines.append(f"| {name} | {n} | " + " | ".join(_cell(values.get(k), k) for k in keys) + " |")
    return lines


def _tests(tests: dict[str, dict[str, dict[str, float | None]]]) -> list[str]:
    lines: list[str] = []
    keys = [k for k in LABELS if k not in ("seconds", "peak_mb")]
    for anchor, rows in tests.items():
        lines += ["", f"Paired two-sided t-tests (scipy.stats.ttest_rel) against **{anchor}**, p-values "
                  "over the images where both values exist:", "",
                  "| method | " + " | ".join(LABELS[k][0] for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for name, ps in rows.items():
            lines.append(f"| {name} | " + " | ".join(_p(ps.get(k)) for k in keys) + " |")
    return lines


def write_report(out: Path, metrics: dict[str, dict[str, Any]], run: dict[str, Any],
                 montage: list[tuple[Any, dict[str, npt.NDArray[np.float32] | None]]]) -> None:
    """report.md, metrics.png and montage.png under ``out``."""
    figures = [f for f in (_distributions(out, run), _montage(out, montage)) if f]
    engine = run["engine"]
    clf = run.get("classifier")
    lines = [
        "# mr2nst evaluation report", "",
        f"Command: `{run['command']}`" if run.get("command") else "", "",
        f"{run['sources']} source images; {run['bank_references']} target images in the reference bank, "
        f"{run['held_out_targets']} held out ({run['held_out_rule']}); true target rendering: "
        f"{'yes' if run['truth'] else 'no'}.", "",
        "## Results", "", *table(metrics, run.get("reference_row") if run["truth"] else None), "",
        "Mean ± sd over images; — = cannot be computed with the inputs given (never invented). "
        "mr2nst_s0/s1/s2 are the stitched scales of the same mr2nst run, so they have no cost of their own.",
        *_tests(run["paired_tests"]), "", "## Methods", "",
        *[f"- **{k}**: {v}" for k, v in DESCRIPTIONS.items() if k in metrics or k == "true_target"],
        "", "## Metrics", "", *[f"- **{v[0]}** (`{k}`): {v[1]}." for k, v in LABELS.items()],
        "", "## Settings", "",
        f"- Intensity scale of every comparison: {run['intensity_scale']} (the float image the node writes).",
        f"- Engine: patch {engine['patch_size']}, grids {engine['grids']}, overlap {engine['overlap']}, "
        f"iterations {engine['iterations']}, lr {engine['lr']:g}, alpha {engine['alpha']:g}, pooling "
        f"{engine['pooling']}, init {engine['init']}, features {engine['features']}, device {engine['device']}; "
        f"references {run['references']}; refiner {run['refiner'] or 'untrained (average of the scales)'}.",
        f"- Style metric network: {run['metric_features']}."
        + (" With seeded-random features these are random VGG19 filters, not ImageNet ones; the metric "
           "uses a different seed than the engine so it does not score the exact filters being optimised."
           if engine["features"] == "seeded-random" else ""),
        "- Domain realism takes the role NIMA had in the paper (no NIMA weights here): a ResNet18 "
        "(torchvision, no pretrained weights, 1 input channel) trained on random native-resolution crops "
        "of held-apart source images vs the held-out target images; an output counts as target when the "
        "mean probability over 16 seeded breast crops is above 0.5. "
        + (f"Settings: {clf}." if clf else "Not trained: no --domain-source was given, so the column is null."),
        "", "## Figures", "", *[f"![{f}]({f})" for f in figures], "",
    ]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def _distributions(out: Path, run: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_image = run["per_image"]
    keys = [k for k in LABELS if any(v is not None for vals in per_image.values() for v in vals[k])]
    if not keys:
        return None
    cols = 3
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.ravel(), keys, strict=False):
        names = [n for n, vals in per_image.items() if any(v is not None for v in vals[key])]
        data = [[v for v in per_image[n][key] if v is not None and math.isfinite(v)] for n in names]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(LABELS[key][0], fontsize=9)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=90)
    plt.close(fig)
    return "metrics.png"


def _montage(out: Path, cases: list[tuple[Any, dict[str, npt.NDArray[np.float32] | None]]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cases:
        return None
    wanted = ["passthrough", "ehm", "nst_single", "mr2nst", "mr2nst_trained"]
    half = 24
    fig_rows = []
    for item, outputs in cases:
        panels = [(n, outputs[n]) for n in wanted if outputs.get(n) is not None]
        if item.truth is not None:
            panels.append(("true target", item.truth))
        centre = np.median(item.calcs[:, :2], axis=0) if item.calcs is not None and len(item.calcs) else None
        fig_rows.append((item, panels, centre))
    ncols = max(len(p) for _, p, _ in fig_rows)
    fig, axes = plt.subplots(2 * len(fig_rows), ncols, figsize=(2.6 * ncols, 5.6 * len(fig_rows)),
                             squeeze=False)
    for r, (item, panels, centre) in enumerate(fig_rows):
        for c in range(ncols):
            top, zoom = axes[2 * r, c], axes[2 * r + 1, c]
            top.axis("off")
            zoom.axis("off")
            if c >= len(panels):
                continue
            name, image = panels[c]
            top.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
            top.set_title(f"{item.name}: {name}", fontsize=7)
            if centre is None:
                continue
            r0 = int(np.clip(centre[0] - half, 0, image.shape[0] - 2 * half))
            c0 = int(np.clip(centre[1] - half, 0, image.shape[1] - 2 * half))
            top.add_patch(plt.Rectangle((c0, r0), 2 * half, 2 * half, fill=False, color="red", lw=0.8))
            crop = image[r0:r0 + 2 * half, c0:c0 + 2 * half]
            lo, hi = np.percentile(crop, [1, 99.5])
            zoom.imshow(crop, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
            zoom.set_title("µC zoom (own window)", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "montage.png", dpi=110)
    plt.close(fig)
    return "montage.png"
