"""The bench-only early stop: ``Mr2nstEngine.transfer``'s ``stop_at`` (``docs/engine.md``).

``mr2nst bench`` times how fast the engine reaches the plain loop's loss. It gives each
tile a loss threshold, and each scale stops once the summed loss of its optimized tiles
is at or below the sum of theirs: :class:`ScaleStop` turns the thresholds into one goal
per batch, and :class:`LossGoal` ends a batch's Adam loop at the first iterate that
meets its goal. A production transfer has neither.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from .tiling import Tile

#: Loss thresholds for an early stop, keyed by tile ``(scale, i, j)``.
StopAt = Mapping[tuple[int, int, int], float]


class ScaleStop:
    """The early stop of one scale, batch by batch.

    The scale stops once the summed loss of its optimized tiles is at or below the sum of
    their thresholds: a batch's goal is its tiles' thresholds plus the margin the scale's
    earlier batches left (their thresholds less their final losses).
    """

    def __init__(self, thresholds: StopAt) -> None:
        self._thresholds = thresholds
        self._slack = 0.0  # the goal's margin left to this scale's next batches
        self._goal = 0.0

    @classmethod
    def for_scale(
        cls, batches: Sequence[Sequence[Tile]], stop_at: StopAt | None
    ) -> ScaleStop | None:
        """The stop of the scale whose optimized tiles are cut into ``batches``.

        None without ``stop_at``, or when one of those tiles has no threshold (the scale
        then runs in full)."""
        if stop_at is None:
            return None
        keys = [(t.scale, t.i, t.j) for batch in batches for t in batch]
        return cls(stop_at) if keys and all(key in stop_at for key in keys) else None

    def goal(self, batch: Sequence[Tile]) -> float:
        """The summed-loss goal of the scale's next ``batch``."""
        self._goal = self._slack + math.fsum(self._thresholds[(t.scale, t.i, t.j)] for t in batch)
        return self._goal

    def spent(self, losses: Sequence[float]) -> None:
        """Record the final losses of the batch last given a :meth:`goal`."""
        self._slack = self._goal - math.fsum(losses)


class LossGoal:
    """The early stop of one batch: reached at the first iterate whose summed loss is at or
    below ``goal``.

    Under autocast (``reduced``) the loss of an iterate is a reduced-precision one, so a
    value at or below the goal is confirmed by the float32 ``exact`` loss, at most once
    every ``every`` iterations.
    """

    def __init__(
        self, goal: float, exact: Callable[[Tensor], Tensor], reduced: bool, every: int
    ) -> None:
        self.goal = goal
        self._exact = exact
        self._reduced = reduced
        self._every = max(1, every)
        self._checked = -self._every  # the last iteration whose iterate got a float32 check

    def reached(self, iteration: int, total: Tensor, image: Tensor) -> bool:
        """Whether ``image``, the iterate of ``iteration`` with summed loss ``total``,
        meets the goal."""
        if not float(total.detach()) <= self.goal:
            return False
        if not self._reduced:
            return True
        if iteration - self._checked < self._every:
            return False
        self._checked = iteration
        return float(self._exact(image.detach()).double().sum()) <= self.goal
