"""AP, FROC and the paired bootstrap of the detection study, against hand-worked cases."""

import pytest

from mr2nst.core.lab.detection_eval import (
    Detection,
    Lesion,
    average_precision,
    froc,
    match,
    paired_bootstrap,
    resampled,
)

LESIONS = [
    Lesion("A", 10, 10, 5, "calc"),
    Lesion("A", 50, 50, 5, "calc"),
    Lesion("B", 20, 20, 5, "calc"),
]
# In score order: hit L1, miss, hit L2, a second hit on L1 (a false positive), hit L3.
DETECTIONS = [
    Detection("A", 11, 10, 0.9, "calc"),
    Detection("B", 80, 80, 0.8, "calc"),
    Detection("A", 50, 52, 0.7, "calc"),
    Detection("A", 10, 12, 0.6, "calc"),
    Detection("B", 21, 19, 0.5, "calc"),
]


def test_match_takes_scores_in_order_and_counts_duplicates_as_false():
    """Each lesion is found once; a second detection on it is a false positive."""
    scores, hits = match(list(reversed(DETECTIONS)), LESIONS)
    assert scores.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert hits.tolist() == [True, False, True, False, True]


def test_average_precision_by_hand():
    """Precision 1, .5, .667, .5, .6 at recall 1/3, 1/3, 2/3, 2/3, 1; interpolated from
    the right: AP = (1 + .667 + .6) / 3 = 0.7556."""
    assert average_precision(DETECTIONS, LESIONS) == pytest.approx((1 + 2 / 3 + 0.6) / 3)


def test_froc_and_recall_at_false_positives_per_image_by_hand():
    """Two images: FP/image 0, 0, .5, .5, 1, 1 against sensitivity 0, 1/3, 1/3, 2/3, 2/3, 1."""
    curve = froc(DETECTIONS, LESIONS, n_images=2)
    assert curve.fp_per_image.tolist() == [0, 0, 0.5, 0.5, 1, 1]
    assert curve.sensitivity.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    assert curve.recall_at(0.0) == pytest.approx(1 / 3)
    assert curve.recall_at(0.5) == pytest.approx(2 / 3)
    assert curve.recall_at(1.0) == pytest.approx(1.0)


def test_min_radius_widens_a_tiny_lesion_hit_zone():
    """A detection 3 px from a 1-px lesion misses it, unless min_radius is 4."""
    lesion = [Lesion("A", 0, 0, 1, "calc")]
    det = [Detection("A", 3, 0, 1.0, "calc")]
    assert average_precision(det, lesion) == 0.0
    assert average_precision(det, lesion, min_radius=4) == 1.0


def test_no_lesions_or_no_detections():
    """Without lesions AP is 0; without detections the FROC stays at 0."""
    assert average_precision(DETECTIONS, []) == 0.0
    assert average_precision([], LESIONS) == 0.0
    assert froc([], LESIONS, n_images=2).recall_at(1.0) == 0.0


def test_resampled_keeps_repeated_images_apart():
    """An image drawn twice contributes its lesions and detections twice."""
    lesions, detections = resampled(LESIONS, DETECTIONS, ["A", "A"])
    assert len(lesions) == 4 and len(detections) == 6
    assert {x.image for x in lesions} == {"A#0", "A#1"}
    only_a = ([d for d in DETECTIONS if d.image == "A"], [x for x in LESIONS if x.image == "A"])
    assert average_precision(detections, lesions) == average_precision(*only_a) == 1.0


def test_paired_bootstrap_interval():
    """The same method against itself: 0 [0, 0]. One that drops only the false positives
    is never worse on any resample (the draw of A twice ties), so its interval is >= 0."""

    def ap(dets):
        return lambda sample: average_precision(*reversed(resampled(LESIONS, dets, sample)))

    images = ["A", "B"]
    same = paired_bootstrap(ap(DETECTIONS), ap(DETECTIONS), images, draws=200)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    perfect = [d for d in DETECTIONS if d.score in (0.9, 0.7, 0.5)]
    better = paired_bootstrap(ap(perfect), ap(DETECTIONS), images, draws=200)
    assert better["difference"] == pytest.approx(1 - (1 + 2 / 3 + 0.6) / 3)
    assert 0 <= better["low"] <= better["difference"] <= better["high"]
    assert better["high"] > 0


def test_pooled_per_image_hits_give_the_same_ap_and_froc_as_matching_again():
    """Matching never crosses images: pooling per-image hits of a resample (with repeats)
    gives the AP and FROC of matching the resampled lists from scratch."""
    import numpy as np

    from mr2nst.core.lab.detection_eval import (
        ap_of_hits,
        froc_of_hits,
        per_image,
        pooled,
    )

    rng = np.random.default_rng(3)
    names = [f"im{i}" for i in range(6)]
    lesions = [
        Lesion(n, float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), 8.0, "mass")
        for n in names
        for _ in range(int(rng.integers(0, 3)))
    ]
    detections = [
        Detection(
            n, float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), float(rng.random()), "mass"
        )
        for n in names
        for _ in range(5)
    ] + [Detection(x.image, x.x + 2, x.y, float(rng.random()), "mass") for x in lesions]
    by_image = per_image(detections, lesions, names)
    for _draw in range(5):
        sample = [names[i] for i in rng.integers(len(names), size=len(names))]
        again_lesions, again_dets = resampled(lesions, detections, sample)
        hits, n_lesions = pooled(sample, by_image)
        assert n_lesions == len(again_lesions)
        assert ap_of_hits(hits, n_lesions) == pytest.approx(
            average_precision(again_dets, again_lesions)
        )
        curve = froc_of_hits(hits, n_lesions, len(sample))
        expected = froc(again_dets, again_lesions, len(sample))
        assert curve.recall_at(1.0) == pytest.approx(expected.recall_at(1.0))
        assert curve.sensitivity.tolist() == pytest.approx(expected.sensitivity.tolist())
