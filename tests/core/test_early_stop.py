"""Tests of the bench-only early stop (mr2nst.core.early_stop) without any network."""

from __future__ import annotations

import torch

from mr2nst.core.early_stop import LossGoal, ScaleStop
from mr2nst.core.tiling import tiles_for


def test_scale_stop_needs_a_threshold_for_every_optimized_tile() -> None:
    """No stop_at, or a tile without a threshold, means no stop for the scale."""
    tiles = tiles_for((32, 32), 2, 0.125, scale=1)
    batches = [tiles[:2], tiles[2:]]
    assert ScaleStop.for_scale(batches, None) is None
    assert ScaleStop.for_scale(batches, {(1, 0, 0): 1.0}) is None
    assert ScaleStop.for_scale([], {(1, 0, 0): 1.0}) is None
    full = {(1, t.i, t.j): 1.0 for t in tiles}
    assert ScaleStop.for_scale(batches, full) is not None


def test_scale_stop_carries_the_margin_of_earlier_batches() -> None:
    """A batch's goal is its thresholds plus what earlier batches left under theirs."""
    tiles = tiles_for((32, 32), 2, 0.125, scale=0)
    thresholds = {(0, t.i, t.j): 1.0 + t.i + t.j for t in tiles}  # 1, 2, 2, 3
    stop = ScaleStop.for_scale([tiles[:2], tiles[2:]], thresholds)
    assert stop is not None
    assert stop.goal(tiles[:2]) == 3.0
    stop.spent([0.5, 1.0])  # 1.5 under the goal
    assert stop.goal(tiles[2:]) == 6.5


def test_loss_goal_in_float32_stops_at_the_first_iterate_at_or_below_it() -> None:
    """Without autocast the iterate's own loss decides; the exact loss is never asked for."""
    asked: list[int] = []

    def exact(image: torch.Tensor) -> torch.Tensor:
        asked.append(1)
        return image

    goal = LossGoal(1.0, exact, reduced=False, every=5)
    image = torch.zeros(2, 1, 4, 4)
    assert not goal.reached(0, torch.tensor(1.5), image)
    assert not goal.reached(1, torch.tensor(float("nan")), image)
    assert goal.reached(2, torch.tensor(1.0), image)
    assert asked == []


def test_loss_goal_under_autocast_confirms_in_float32_at_most_every_few_iterations() -> None:
    """A reduced-precision loss at the goal is confirmed by the exact one, once per `every`."""
    exact_losses = iter([2.0, 0.25])
    asked: list[int] = []

    def exact(image: torch.Tensor) -> torch.Tensor:
        asked.append(1)
        return torch.tensor([next(exact_losses)])

    goal = LossGoal(1.0, exact, reduced=True, every=3)
    image = torch.zeros(1, 1, 4, 4)
    assert not goal.reached(0, torch.tensor(0.5), image)  # exact 2.0: not yet
    assert not goal.reached(1, torch.tensor(0.5), image)  # too soon to ask again
    assert not goal.reached(2, torch.tensor(0.5), image)
    assert goal.reached(3, torch.tensor(0.5), image)  # exact 0.25
    assert len(asked) == 2
