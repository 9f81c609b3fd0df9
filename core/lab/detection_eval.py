"""Scoring a lesion detector: AP, FROC and recall at fixed false positives per image.

The detection study (issue 15) scores a CAD's point detections against the phantoms'
ground truth, per lesion type (``mass``, ``calc``). The rules, written once here:

- A detection *hits* a lesion of its type when its point lies within the lesion's
  radius (at least ``min_radius`` pixels, so that a µC cluster's or a small mass's hit
  zone is not a single pixel).
- Detections are taken in descending score; each is matched to the nearest unmatched
  lesion it hits on its image. A detection that hits no unmatched lesion (none at all,
  or only lesions already found) is a false positive, as in PASCAL VOC.
- **AP** is the area under the precision–recall curve with VOC's all-point
  interpolation (precision made monotone from the right), over every lesion of the type.
- **FROC**: after each detection, the sensitivity (lesions found / lesions) against the
  false positives per image (false positives / images). ``recall_at(fp)`` is the highest
  sensitivity reached with at most ``fp`` false positives per image.
- **Paired bootstrap**: images are resampled with replacement, the same draw for both
  methods, and the difference of a metric (method − baseline) is recomputed per draw;
  the confidence interval is the percentile interval of those differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Lesion:
    """One ground-truth lesion: its image, centre (x, y), radius in pixels and type."""

    image: str
    x: float
    y: float
    radius: float
    kind: str


@dataclass(frozen=True)
class Detection:
    """One detector output: its image, point (x, y), score and type."""

    image: str
    x: float
    y: float
    score: float
    kind: str


@dataclass(frozen=True)
class Froc:
    """A FROC curve: false positives per image and sensitivity after each detection."""

    fp_per_image: npt.NDArray[np.float64]
    sensitivity: npt.NDArray[np.float64]

    def recall_at(self, fp_per_image: float) -> float:
        """The highest sensitivity reached with at most ``fp_per_image`` false positives
        per image (0 when none is)."""
        within = self.sensitivity[self.fp_per_image <= fp_per_image + 1e-12]
        return float(within.max()) if within.size else 0.0


def match(
    detections: Sequence[Detection],
    lesions: Sequence[Lesion],
    min_radius: float = 0.0,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Match detections to lesions (one type), in descending score.

    Returns:
        The scores in that order, and whether each detection is a true positive.
    """
    order = sorted(detections, key=lambda d: -d.score)
    by_image: dict[str, list[Lesion]] = {}
    for lesion in lesions:
        by_image.setdefault(lesion.image, []).append(lesion)
    found: set[int] = set()
    hits = np.zeros(len(order), dtype=bool)
    for n, det in enumerate(order):
        best, best_distance = None, math.inf
        for lesion in by_image.get(det.image, []):
            distance = math.hypot(det.x - lesion.x, det.y - lesion.y)
            if (
                id(lesion) not in found
                and distance <= max(lesion.radius, min_radius)
                and distance < best_distance
            ):
                best, best_distance = lesion, distance
        if best is not None:
            found.add(id(best))
            hits[n] = True
    return np.array([d.score for d in order], dtype=np.float64), hits


def average_precision(
    detections: Sequence[Detection], lesions: Sequence[Lesion], min_radius: float = 0.0
) -> float:
    """VOC all-point interpolated AP (0 without lesions or detections)."""
    _, hits = match(detections, lesions, min_radius)
    return ap_of_hits(hits, len(lesions))


def ap_of_hits(hits: npt.NDArray[np.bool_], n_lesions: int) -> float:
    """VOC all-point interpolated AP of detections in descending score, given which hit."""
    if not n_lesions or not hits.size:
        return 0.0
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / n_lesions
    precision = np.concatenate([[0.0], precision, [0.0]])
    recall = np.concatenate([[0.0], recall, [recall[-1]]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone from the right
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def froc(
    detections: Sequence[Detection],
    lesions: Sequence[Lesion],
    n_images: int,
    min_radius: float = 0.0,
) -> Froc:
    """The FROC curve over ``n_images`` images (starting at 0 FP, 0 sensitivity)."""
    _, hits = match(detections, lesions, min_radius)
    return froc_of_hits(hits, len(lesions), n_images)


def froc_of_hits(hits: npt.NDArray[np.bool_], n_lesions: int, n_images: int) -> Froc:
    """The FROC curve of detections in descending score, given which hit."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    tp = np.concatenate([[0], np.cumsum(hits)])
    fp = np.concatenate([[0], np.cumsum(~hits)])
    sensitivity = tp / max(1, n_lesions)
    return Froc(fp / n_images, sensitivity.astype(np.float64))


@dataclass(frozen=True)
class ImageHits:
    """One image's detections of one type, matched: their scores, which hit, and how many
    lesions the image holds. Matching never crosses images, so a resample of images can
    pool these instead of matching again (:func:`pooled`)."""

    scores: npt.NDArray[np.float64]
    hits: npt.NDArray[np.bool_]
    lesions: int


def per_image(
    detections: Sequence[Detection],
    lesions: Sequence[Lesion],
    images: Sequence[str],
    min_radius: float = 0.0,
) -> dict[str, ImageHits]:
    """:class:`ImageHits` of every image in ``images`` (one lesion type)."""
    out = {}
    for name in images:
        mine = [x for x in lesions if x.image == name]
        scores, hits = match([d for d in detections if d.image == name], mine, min_radius)
        out[name] = ImageHits(scores, hits, len(mine))
    return out


def pooled(
    sample: Sequence[str], by_image: dict[str, ImageHits]
) -> tuple[npt.NDArray[np.bool_], int]:
    """The images of ``sample`` (repeats are distinct images) as one ranked list: which
    detection hit, in descending score, and the number of lesions."""
    parts = [by_image[name] for name in sample]
    if not parts:
        return np.zeros(0, dtype=bool), 0
    scores = np.concatenate([p.scores for p in parts])
    hits = np.concatenate([p.hits for p in parts])
    order = np.argsort(-scores, kind="stable")
    return hits[order], sum(p.lesions for p in parts)


Metric = Callable[[Sequence[str]], float]


def resampled(
    lesions: Sequence[Lesion], detections: Sequence[Detection], sample: Sequence[str]
) -> tuple[list[Lesion], list[Detection]]:
    """Lesions and detections of the images in ``sample``; an image drawn k times is
    there k times, as distinct images (``name#0``, ``name#1``, ...)."""
    seen: dict[str, int] = {}
    out_lesions: list[Lesion] = []
    out_detections: list[Detection] = []
    for name in sample:
        copy = f"{name}#{seen.get(name, 0)}"
        seen[name] = seen.get(name, 0) + 1
        out_lesions += [replace(x, image=copy) for x in lesions if x.image == name]
        out_detections += [replace(x, image=copy) for x in detections if x.image == name]
    return out_lesions, out_detections


def paired_bootstrap(
    method: Metric,
    baseline: Metric,
    images: Sequence[str],
    draws: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """The difference ``method − baseline`` and its paired bootstrap interval.

    Args:
        method: the metric of one method on a list of images (repeats allowed).
        baseline: the same metric of the baseline.
        images: the test images.
        draws: bootstrap resamples.
        seed: the resampling seed.
        level: the interval's coverage.

    Returns:
        ``{"difference", "low", "high"}``.
    """
    rng = np.random.default_rng(seed)
    names = list(images)
    deltas = []
    for _ in range(draws):
        sample = [names[i] for i in rng.integers(len(names), size=len(names))]
        deltas.append(method(sample) - baseline(sample))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return {
        "difference": method(names) - baseline(names),
        "low": float(low),
        "high": float(high),
    }
