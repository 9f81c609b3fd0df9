"""Tests of the lesion detector of the detection study (mr2nst.core.lab.detector)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mr2nst.core.lab.detection_eval import Lesion
from mr2nst.core.lab.detector import (
    KINDS,
    Detector,
    DetectorConfig,
    DetectorSettings,
    Sample,
    _example,
    calc_clusters,
    detect,
    focal_loss,
    heatmaps,
    lesions_from_truth,
    target_heatmaps,
    train_detector,
)

SMALL = DetectorConfig(width=8, depth=3)


def test_calc_clusters_groups_planted_clusters_and_keeps_a_lone_calc():
    """Two tight clusters far apart and one lone µC: three clusters, sorted by row, at the
    members' centroids, radius = farthest member + 3 (at least 6)."""
    a = [(20, 30, 2), (24, 30, 1), (20, 34, 3), (24, 34, 2)]  # centroid (22, 32)
    b = [(80, 90, 2), (86, 90, 2), (83, 96, 1)]  # centroid (83, 92)
    lone = [(150, 10, 3)]
    calcs = np.array(b + lone + a, dtype=float)
    clusters = calc_clusters(calcs, image_shape=(192, 160))
    assert len(clusters) == 3
    (r0, c0, q0), (r1, c1, q1), (r2, c2, q2) = clusters
    assert (r0, c0) == pytest.approx((22, 32))
    assert q0 == pytest.approx(max(6.0, math.hypot(2, 2) + 3))
    assert (r1, c1) == pytest.approx((83, 92))
    assert q1 == pytest.approx(4.0 + 3)  # farthest: (83, 96), 4 px from the centroid
    assert (r2, c2, q2) == pytest.approx((150, 10, 6.0))
    assert calc_clusters(np.zeros((0, 3))) == []
    # A link shorter than the members' spacing splits the first cluster.
    assert len(calc_clusters(np.array(a, dtype=float), link=3.5)) == 4


def test_lesions_from_truth_converts_masses_and_clusters():
    truth = {
        "rows": 192,
        "columns": 160,
        "masses": [[50.0, 40.0, 7.5], [100.0, 120.0, 2.0]],
        "calcs": [[140.0, 60.0, 2.0], [144.0, 60.0, 2.0]],
    }
    lesions = lesions_from_truth("img", truth)
    assert lesions == [
        Lesion("img", 40.0, 50.0, 7.5, "mass"),
        Lesion("img", 120.0, 100.0, 4.0, "mass"),  # at least 4 px
        Lesion("img", 60.0, 142.0, 6.0, "calc"),
    ]


def test_target_heatmaps_peak_at_the_lesion_cell_in_its_channel():
    """Stride 2: pixel 7 lies in cell 3, pixel 11 in cell 5."""
    config = DetectorConfig(out_stride=2)
    target = target_heatmaps([Lesion("a", 11, 7, 6, "calc")], (16, 16), config)
    assert target.shape == (len(KINDS), 16, 16)
    calc = KINDS.index("calc")
    assert target[calc, 3, 5] == 1.0
    assert np.unravel_index(np.argmax(target[calc]), (16, 16)) == (3, 5)
    assert (target[calc] < 1).sum() == 16 * 16 - 1
    assert not target[KINDS.index("mass")].any()


def test_focal_loss_is_small_for_a_confident_right_answer():
    target = torch.from_numpy(
        target_heatmaps([Lesion("a", 8, 8, 4, "mass")], (8, 8), DetectorConfig())
    )[None]
    right = torch.where(target.eq(1), 8.0, -8.0)
    wrong = torch.where(target.eq(1), -8.0, 8.0)
    assert float(focal_loss(right, target)) < 0.01 < float(focal_loss(wrong, target))


def test_flipped_examples_move_the_targets_with_the_image():
    rng = np.random.default_rng(0)
    image = rng.random((32, 32), dtype=np.float32)
    sample = Sample("a", image, [Lesion("a", 5, 9, 4, "mass"), Lesion("a", 20, 26, 8, "calc")])
    x, y = _example(sample, False, False, SMALL)
    for vertical, horizontal in [(True, False), (False, True), (True, True)]:
        fx, fy = _example(sample, vertical, horizontal, SMALL)
        dims = [d for d, on in ((-2, vertical), (-1, horizontal)) if on]
        assert torch.equal(fx, x.flip(dims))
        assert torch.equal(fy, y.flip(dims))


def _planted(seed: int) -> Sample:
    """64x64 noise with a bright blob (mass, radius 5) and a cluster of 5 dots (calc)."""
    rng = np.random.default_rng(seed)
    h = w = 64
    image = rng.normal(0.3, 0.04, (h, w)).astype(np.float32)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    top = seed % 2 == 0  # the mass in the top or bottom half, the cluster in the other
    mr, mc = (16.0 if top else 46.0) + rng.uniform(-3, 3), rng.uniform(14, 50)
    image += 0.35 * np.exp(-((rows - mr) ** 2 + (cols - mc) ** 2) / (2 * 3.0**2))
    cr, cc = (46.0 if top else 16.0) + rng.uniform(-3, 3), rng.uniform(14, 50)
    offsets = [(0, 0), (-5, -4), (-4, 5), (5, -5), (4, 4)]
    calcs = np.array([(cr + dr, cc + dc, 1.0) for dr, dc in offsets])
    for r, c, _ in calcs:
        image[int(round(r)), int(round(c))] += 0.6
    image = np.clip(image, 0, 1)
    name = f"p{seed}"
    lesions = [Lesion(name, mc, mr, 5.0, "mass")]
    lesions += [Lesion(name, c, r, q, "calc") for r, c, q in calc_clusters(calcs)]
    return Sample(name, image, lesions)


def test_the_detector_overfits_a_tiny_set_and_finds_the_planted_mass():
    samples = [_planted(seed) for seed in range(4)]
    seen: list[tuple[int, float]] = []
    settings = DetectorSettings(epochs=40, batch=4, lr=5e-3, seed=0)
    detector, losses = train_detector(samples, SMALL, settings, lambda e, v: seen.append((e, v)))
    assert len(losses) == 40 and [e for e, _ in seen] == list(range(1, 41))
    assert losses[-1] < losses[0] / 3
    assert not detector.training
    for sample in samples[:2]:
        found = detect(detector, sample.image, sample.name)
        masses = [d for d in found if d.kind == "mass"]
        mass = sample.lesions[0]
        top = max(masses, key=lambda d: d.score)
        assert math.hypot(top.x - mass.x, top.y - mass.y) <= mass.radius
        cluster = sample.lesions[1]
        best = max((d for d in found if d.kind == "calc"), key=lambda d: d.score)
        assert math.hypot(best.x - cluster.x, best.y - cluster.y) <= cluster.radius
        assert all(d.image == sample.name for d in found)


def test_detect_on_an_odd_sized_image_returns_points_inside_it():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        detector = Detector(SMALL).eval()
    image = np.random.default_rng(1).random((70, 53), dtype=np.float32)
    assert heatmaps(detector, image).shape == (len(KINDS), 35, 27)
    found = detect(detector, image, "odd", max_per_kind=50, min_score=0.0)
    assert found
    assert {d.kind for d in found} == set(KINDS)
    for kind in KINDS:
        mine = [d for d in found if d.kind == kind]
        assert len(mine) <= 50
        assert [d.score for d in mine] == sorted((d.score for d in mine), reverse=True)
    assert all(0 <= d.x <= 52 and 0 <= d.y <= 69 for d in found)


def test_detector_shapes_and_config_checks():
    detector = Detector(DetectorConfig(width=8, depth=3, out_stride=4))
    assert detector(torch.zeros(2, 1, 32, 48)).shape == (2, len(KINDS), 8, 12)
    with pytest.raises(ValueError, match="out_stride"):
        DetectorConfig(depth=2, out_stride=8)
    with pytest.raises(ValueError, match="width"):
        DetectorConfig(width=6)
    with pytest.raises(ValueError, match="epochs"):
        DetectorSettings(epochs=0)
    assert DetectorSettings().as_dict()["epochs"] == 60
    plain = {**DetectorConfig().as_dict(), "windows": [9, 11]}  # as read back from JSON
    assert DetectorConfig(**plain) == DetectorConfig()
