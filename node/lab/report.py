"""The evaluation's report: ``report.md`` (tables), ``metrics.png`` (distributions) and
``montage.png`` (before/after with native-resolution zooms). matplotlib with the Agg backend.

The montage (:func:`montage_png`, also the demo's ``before_after.png``) has, per case, three
rows with one column per panel ``source | each method | true UIH``:

1. the whole images, with the two zoom windows outlined (red: µC cluster, cyan: edge);
2. a ``ZOOM`` x ``ZOOM`` px crop on a µC cluster, each pixel repeated ``ZOOM_FACTOR`` times
   (nearest neighbour: no resampling blur). The cluster is the known µC with the most
   other µCs within ``ZOOM / 2`` px; the crop is centred on the mean position of that group;
3. the same kind of crop on an edge (a vessel or a glandular border): the maximum of the
   Gaussian gradient magnitude (σ ``EDGE_SIGMA`` = 1.5 px) of the reference image (the true
   UIH, else the source) inside the breast mask eroded by ``ZOOM / 2`` px (the whole crop
   lies in the breast, so the skin line is not chosen), excluding every pixel within
   ``ZOOM * 0.75`` px of a known µC (the crop shows no µC). When that leaves nothing (small
   images), the µC exclusion shrinks to ``EDGE_MARGIN`` = 8 px (the edge is not a µC's rim,
   though the crop may show µCs), then the erosion too, and last the whole mask is used.

Every panel of a row shares one grey window: the 0.5-99.5 percentiles of the row's last
panel (the true UIH when present), over the breast for row 1 and over the crop for rows 2-3,
so brightness and contrast differences between the panels stay visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

LABELS = {
    "style_gram": (
        "Gram dist ↓",
        "relative Frobenius distance of masked Gram matrices at relu1_1..relu5_1 "
        "to the mean Gram of the held-out target images",
    ),
    "hist_w1": (
        "W1 hist ↓",
        "Wasserstein-1 distance of breast pixel values to the pooled held-out target breast pixels",
    ),
    "ssim": (
        "SSIM ↑",
        "SSIM map (skimage) averaged inside the breast mask, against the true target rendering",
    ),
    "psnr": ("PSNR dB ↑", "PSNR of the breast pixels against the true target rendering"),
    "uc_cnr_ratio": (
        "µC CNR ratio →1",
        "mean µC contrast-to-noise ratio (disk vs annulus 2-5 px out) "
        "of the output over that of the true target rendering",
    ),
    "uc_detected": (
        "µC detected ↑",
        "fraction of known µCs found by a fixed white top-hat spot "
        "detector (disk r=4 px, 4 robust sigmas, match within 2 px)",
    ),
    "spectrum_dist": (
        "spectrum dist ↓",
        "RMS difference of log10 power over 9 radial frequency bins "
        "(0.05-0.5 cycles/px) between the high-passed (minus Gaussian σ 3 px), "
        "windowed breast (mask eroded 8 px, 2 px taper) and the mean of the held-out "
        "target images; needs no truth",
    ),
    "sharpness_ratio": (
        "sharpness →1",
        "RMS of image minus its Gaussian low-pass (σ 2 px) inside "
        "the mask eroded 6 px, over the same for the true target rendering "
        "(sqrt of the high-frequency energy ratio); below 1 = softer than UIH",
    ),
    "structure_ssim": (
        "low-pass SSIM ↑",
        "SSIM of both images low-passed with a Gaussian of σ 1.5 px, "
        "averaged inside the mask, against the true target rendering: structure "
        "without scoring independent noise grain",
    ),
    "domain_target_fraction": (
        "called target ↑",
        "fraction of outputs the ResNet18 domain classifier "
        "calls target-domain (stands in for the paper's NIMA score)",
    ),
    "seconds": ("s/image", "wall time per image of the method call"),
    "peak_mb": (
        "peak MB",
        "peak memory per image: CUDA peak allocation on a GPU, rise of the "
        "process's resident memory over the call on the CPU (sampled every 10 ms)",
    ),
}
DESCRIPTIONS = {
    "passthrough": "source image unchanged (the GE rendering)",
    "ehm": "exact histogram matching to the selected references",
    "spectral": "EHM, then the breast's radial power spectrum matched to the references' mean by a "
    "clipped frequency-domain gain, then EHM again (no GPU)",
    "nst_single": "single-reference, single-scale NST (grid 1 only)",
    "mr2nst_1ref": "mr2NST, all scales, 1 reference",
    "mr2nst": "mr2NST, all scales, methods.references references, untrained refiner "
    "(engine.merge: average of the scales or sum of their bands)",
    "mr2nst_s0": "scale 0 of the mr2nst run alone",
    "mr2nst_s1": "scale 1 of the mr2nst run alone",
    "mr2nst_s2": "scale 2 of the mr2nst run alone",
    "mr2nst_trained": "the same run's scales (or bands) merged by the trained refiner",
    "fast": "the fast student of the mr2nst row (mr2nst train-fast): one feed-forward pass "
    "with mr2nst's scaling, references and tone step around it",
    "cyclegan": "the CycleGAN baseline's GE -> UIH generator (mr2nst train-cyclegan), tiled, "
    "with mr2nst's scaling and tone step around it",
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
    lines = [
        "| method | n | " + " | ".join(LABELS[k][0] for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    rows = list(metrics.items()) + ([("true_target", reference)] if reference else [])
    for name, values in rows:
        n = max((v["n"] for v in values.values() if v), default=0)
        lines.append(
            f"| {name} | {n} | " + " | ".join(_cell(values.get(k), k) for k in keys) + " |"
        )
    return lines


def _tests(tests: dict[str, dict[str, dict[str, float | None]]]) -> list[str]:
    lines: list[str] = []
    keys = [k for k in LABELS if k not in ("seconds", "peak_mb")]
    for anchor, rows in tests.items():
        lines += [
            "",
            f"Paired two-sided t-tests (scipy.stats.ttest_rel) against **{anchor}**, p-values "
            "over the images where both values exist:",
            "",
            "| method | " + " | ".join(LABELS[k][0] for k in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for name, ps in rows.items():
            lines.append(f"| {name} | " + " | ".join(_p(ps.get(k)) for k in keys) + " |")
    return lines


def write_report(
    out: Path,
    metrics: dict[str, dict[str, Any]],
    run: dict[str, Any],
    montage: list[tuple[Any, dict[str, npt.NDArray[np.float32] | None]]],
) -> None:
    """report.md, metrics.png and montage.png under ``out``.

    Args:
        out: the evaluation's output folder.
        metrics: ``metrics.json``'s content.
        run: ``run.json``'s content.
        montage: up to two (source item, {method: output}) cases for montage.png.
    """
    figures = [f for f in (_distributions(out, run), _montage(out, montage)) if f]
    lines = [
        "# mr2nst evaluation report",
        "",
        f"Command: `{run['command']}`" if run.get("command") else "",
        "",
        f"{run['sources']} source images; "
        f"{run['bank_references']} target images in the reference bank, "
        f"{run['held_out_targets']} held out ({run['held_out_rule']}); true target rendering: "
        f"{'yes' if run['truth'] else 'no'}.",
        "",
        "## Results",
        "",
        *table(metrics, run.get("reference_row") if run["truth"] else None),
        "",
        "Mean ± sd over images; — = cannot be computed with the inputs given (never invented). "
        "mr2nst_s0/s1/s2 are the stitched scales of the same mr2nst run, "
        "so they have no cost of their own.",
        *_tests(run["paired_tests"]),
        "",
        "## Methods",
        "",
        *[f"- **{k}**: {v}" for k, v in DESCRIPTIONS.items() if k in metrics or k == "true_target"],
        "",
        "## Metrics",
        "",
        *[f"- **{v[0]}** (`{k}`): {v[1]}." for k, v in LABELS.items()],
        "",
        "## Settings",
        "",
        *_settings(run),
        "",
        "## Figures",
        "",
        *[f"![{f}]({f})" for f in figures],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def _settings(run: dict[str, Any]) -> list[str]:
    """The report's settings: scale, engine, metric network and domain classifier."""
    engine = run["engine"]
    clf = run.get("classifier")
    return [
        f"- Intensity scale of every comparison: {run['intensity_scale']} "
        "(the float image the node writes).",
        f"- Engine: patch {engine['patch_size']}, grids {engine['grids']}, "
        f"overlap {engine['overlap']}, "
        f"iterations {engine['iterations']}, lr {engine['lr']:g}, "
        f"alpha {engine['alpha']:g}, pooling "
        f"{engine['pooling']}, init {engine['init']}, features {engine['features']}, "
        f"device {engine['device']}; "
        f"references {run['references']}; "
        f"refiner {run['refiner'] or 'untrained (average of the scales)'}.",
        f"- Style metric network: {run['metric_features']}. "
        "It is never the network the engine optimized: "
        "an engine on hed-vgg16 is scored by VGG19 with seeded-random weights "
        "(seed 7919, or 7920 when "
        "that is the engine's), any other engine by the learned hed-vgg16."
        + (
            " These are random filters, not learned ones."
            if run["metric_features"].startswith("seeded-random")
            else ""
        ),
        "- Domain realism takes the role NIMA had in the paper (no NIMA weights here): a ResNet18 "
        "(torchvision, no pretrained weights, 1 input channel) "
        "trained on random native-resolution crops "
        "of held-apart source images vs the held-out target images; "
        "an output counts as target when the "
        "mean probability over 16 seeded breast crops is above 0.5. "
        + (
            f"Settings: {clf}."
            if clf
            else "Not trained: no --domain-source was given, so the column is null."
        ),
    ]


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
    for ax in axes.ravel()[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=90)
    plt.close(fig)
    return "metrics.png"


#: Montage zooms: crop side (px), pixel repetition, edge-finder σ and skin-line margin (px).
ZOOM = 48
ZOOM_FACTOR = 4
EDGE_SIGMA = 1.5
EDGE_MARGIN = 8


@dataclass(frozen=True)
class MontageCase:
    """One montage case: labelled panels (source first, true UIH last when known) and its truth."""

    name: str
    panels: list[tuple[str, npt.NDArray[np.floating]]]
    mask: npt.NDArray[np.bool_]
    calcs: npt.NDArray[np.float64] | None
    reference: npt.NDArray[np.floating]  # where the edge zoom is looked for


def uc_cluster_centre(
    calcs: npt.NDArray[np.float64] | None, half: int = ZOOM // 2
) -> tuple[float, float] | None:
    """Mean (row, col) of the known µC with the most others within ``half`` px, and those others."""
    if calcs is None or len(calcs) == 0:
        return None
    pts = np.asarray(calcs, dtype=np.float64).reshape(-1, 3)[:, :2]
    near = np.linalg.norm(pts[:, None, :] - pts[None, :, :], axis=-1) <= half
    best = int(np.argmax(near.sum(axis=1)))
    centre = pts[near[best]].mean(axis=0)
    return float(centre[0]), float(centre[1])


def edge_centre(
    reference: npt.NDArray[np.floating],
    mask: npt.NDArray[np.bool_],
    calcs: npt.NDArray[np.float64] | None,
) -> tuple[float, float] | None:
    """(row, col) of the strongest Gaussian gradient (σ ``EDGE_SIGMA``) deep inside the breast,
    away from known µCs (rule in the module docstring); None for an empty mask."""
    from scipy import ndimage as ndi  # type: ignore[import-untyped, unused-ignore]

    if not mask.any():
        return None
    grad = ndi.gaussian_gradient_magnitude(np.asarray(reference, dtype=np.float64), EDGE_SIGMA)
    deep = ndi.binary_erosion(mask, iterations=ZOOM // 2)
    inner = ndi.binary_erosion(mask, iterations=EDGE_MARGIN)
    distance = np.full(mask.shape, np.inf)  # to the nearest known µC
    if calcs is not None and len(calcs):
        seeds = np.ones(mask.shape, dtype=bool)
        rows = np.clip(np.rint(calcs[:, 0]).astype(int), 0, mask.shape[0] - 1)
        cols = np.clip(np.rint(calcs[:, 1]).astype(int), 0, mask.shape[1] - 1)
        seeds[rows, cols] = False
        distance = ndi.distance_transform_edt(seeds)
    far, off = distance > ZOOM * 0.75, distance > EDGE_MARGIN
    for allowed in (deep & far, deep & off, inner & off, mask):
        if allowed.any():
            flat = int(np.argmax(np.where(allowed, grad, -np.inf)))
            row, col = np.unravel_index(flat, mask.shape)
            return float(row), float(col)
    return None


def _crop_origin(centre: tuple[float, float], shape: tuple[int, ...]) -> tuple[int, int]:
    r0 = int(np.clip(round(centre[0]) - ZOOM // 2, 0, max(shape[0] - ZOOM, 0)))
    c0 = int(np.clip(round(centre[1]) - ZOOM // 2, 0, max(shape[1] - ZOOM, 0)))
    return r0, c0


def _window(values: npt.NDArray[np.floating]) -> tuple[float, float]:
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    return float(lo), float(max(hi, lo + 1e-6))


def montage_png(cases: Sequence[MontageCase], path: Path, dpi: int = 100) -> None:
    """Write the montage of ``cases`` to ``path``: per case the whole images, a µC-cluster zoom
    and an edge zoom, each zoom at native resolution repeated ``ZOOM_FACTOR`` times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(len(c.panels) for c in cases)
    side = ZOOM * ZOOM_FACTOR / dpi  # inches: a zoom panel shows each repeated pixel 1:1
    aspect = max(c.panels[0][1].shape[0] / c.panels[0][1].shape[1] for c in cases)
    heights = [v for _ in cases for v in (side * aspect, side, side)]
    fig, axes = plt.subplots(
        3 * len(cases),
        ncols,
        squeeze=False,
        figsize=(side * ncols * 1.08, sum(heights) * 1.25),
        gridspec_kw={"height_ratios": heights},
    )
    for k, case in enumerate(cases):
        zooms, window = _zooms(case)
        for c in range(ncols):
            column = [axes[3 * k + j, c] for j in range(3)]
            for ax in column:
                ax.axis("off")
            if c < len(case.panels):
                _draw_panel(column, case, c, zooms, window)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


@dataclass(frozen=True)
class _Zoom:
    """One zoom row of a montage case: its crop origin (None: nothing to zoom on) and window."""

    label: str
    origin: tuple[int, int] | None
    colour: str
    window: tuple[float, float]


def _zooms(case: MontageCase) -> tuple[list[_Zoom], tuple[float, float]]:
    """The case's two zooms and the whole-image window, all from its last panel."""
    ref = np.asarray(case.panels[-1][1])
    centres = [
        ("µC cluster", uc_cluster_centre(case.calcs), "red"),
        ("edge", edge_centre(case.reference, case.mask, case.calcs), "cyan"),
    ]
    zooms = []
    for label, centre, colour in centres:
        origin = _crop_origin(centre, ref.shape) if centre else None
        window = (
            _window(ref[origin[0] : origin[0] + ZOOM, origin[1] : origin[1] + ZOOM])
            if origin
            else (0.0, 1.0)
        )
        zooms.append(_Zoom(label, origin, colour, window))
    return zooms, _window(ref[case.mask] if case.mask.any() else ref.ravel())


def _draw_panel(
    column: list[Any], case: MontageCase, c: int, zooms: list[_Zoom], window: tuple[float, float]
) -> None:
    """Panel ``c`` of ``case``: the whole image (zoom windows outlined) above its zooms."""
    from matplotlib.patches import Rectangle

    name, image = case.panels[c]
    column[0].imshow(image, cmap="gray", vmin=window[0], vmax=window[1])
    column[0].set_title(f"{case.name}: {name}" if c == 0 else name, fontsize=7)
    for ax, zoom in zip(column[1:], zooms, strict=True):
        if zoom.origin is None:
            ax.set_title(f"{zoom.label}: none", fontsize=6)
            continue
        r0, c0 = zoom.origin
        column[0].add_patch(
            Rectangle((c0 - 0.5, r0 - 0.5), ZOOM, ZOOM, fill=False, color=zoom.colour, lw=0.8)
        )
        crop = np.asarray(image)[r0 : r0 + ZOOM, c0 : c0 + ZOOM]
        big = np.repeat(np.repeat(crop, ZOOM_FACTOR, axis=0), ZOOM_FACTOR, axis=1)
        ax.imshow(
            big, cmap="gray", vmin=zoom.window[0], vmax=zoom.window[1], interpolation="nearest"
        )
        ax.set_title(f"{zoom.label} ({r0},{c0}) x{ZOOM_FACTOR}", fontsize=6)


def _montage(
    out: Path, cases: list[tuple[Any, dict[str, npt.NDArray[np.float32] | None]]]
) -> str | None:
    """montage.png: source | every method but passthrough (the source itself) | true UIH."""
    if not cases:
        return None
    rows = []
    for item, outputs in cases:
        panels: list[tuple[str, npt.NDArray[np.floating]]] = [("source (GE)", item.image)]
        panels += [
            (n, image) for n, image in outputs.items() if n != "passthrough" and image is not None
        ]
        if item.truth is not None:
            panels.append(("true UIH", item.truth))
        reference = item.truth if item.truth is not None else item.image
        rows.append(MontageCase(item.name, panels, item.mask, item.calcs, reference))
    montage_png(rows, out / "montage.png")
    return "montage.png"
