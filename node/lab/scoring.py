"""The evaluation's per-image metrics: what every output is compared against, and the scores.

The metrics themselves live in :mod:`mr2nst.core.metrics`; docs/evaluation.md defines them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

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
#: The metrics of an image; the last two of METRICS are the cost of the method call.
IMAGE_METRICS = METRICS[:-2]
W1_POOL = 200_000  # held-out target pixels pooled for the histogram distance (seeded subsample)


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
    """All image metrics of one output.

    Args:
        image: the output in the common scale, or None where the method gave none.
        item: the source it was made from (mask, and truth where known).
        ctx: the held-out targets' statistics and the domain classifier.

    Returns:
        ``{metric: value}`` for :data:`IMAGE_METRICS`, None where not computable.
    """
    from mr2nst.core import metrics as m

    values: dict[str, float | None] = dict.fromkeys(IMAGE_METRICS)
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


def metric_context(
    config: Any, held: list[Item], domain_source: list[Item], steps: int, device: Any
) -> tuple[Context, dict[str, Any]]:
    """The held-out targets' Gram, pooled pixels and spectrum, and the domain classifier.

    Args:
        config: the node config (the engine's features decide the metric network).
        held: the held-out target images.
        domain_source: source-domain images held apart; none: no classifier.
        steps: the classifier's training steps.
        device: where the metric network runs.

    Returns:
        The context, and what ``run.json`` records of it.
    """
    from mr2nst.core import metrics as m
    from mr2nst.core.features import build_features
    from mr2nst.core.lab.domain_classifier import ClassifierSettings, DomainClassifier

    # Never score an engine with the network it optimized (core.metrics.metric_network).
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
    context = Context(
        features,
        m.mean_grams(grams),
        pool.astype(np.float32),
        m.mean_spectrum(spectra) if spectra else None,
        classifier,
    )
    return context, info
