"""Reference selection (METHOD.md "Reference selection"): the k references of the source's
view whose breast area is closest to the source's, mirrored to the source's laterality."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mr2nst.core.intensity import FloatImage

from .errors import NotEnoughReferences
from .manifest import Entry


@dataclass(frozen=True)
class Reference:
    """A selected reference, ready for an engine: unit float image and mask, mirrored."""

    entry: Entry
    image: FloatImage
    mask: npt.NDArray[np.bool_]
    mirrored: bool


def rank(entries: Sequence[Entry], view: str, area_mm2: float) -> list[Entry]:
    """Entries of ``view``, nearest breast area first (ties by SOP Instance UID)."""
    same = [e for e in entries if e.view == view]
    return sorted(same, key=lambda e: (abs(e.breast_area_mm2 - area_mm2), e.sop_instance_uid))


def choose(
    entries: Sequence[Entry], view: str, area_mm2: float, k: int, allow_fewer: bool
) -> list[Entry]:
    """The k best entries; NotEnoughReferences when fewer exist (unless allowed, and > 0)."""
    if not view:
        raise NotEnoughReferences("the source image has no view (ViewPosition/ViewCodeSequence)")
    ranked = rank(entries, view, area_mm2)
    if len(ranked) < k and not (allow_fewer and ranked):
        raise NotEnoughReferences(
            f"the bank has {len(ranked)} {view} reference(s), {k} are needed "
            f"(add more with `mr2nst bank add`, or lower methods.references)"
        )
    return ranked[:k]


def needs_mirror(entry: Entry, laterality: str, chest_wall_left: bool | None) -> bool:
    """Whether the reference must be flipped left-right to match the source's laterality."""
    if laterality in ("L", "R") and entry.laterality in ("L", "R"):
        return entry.laterality != laterality
    if chest_wall_left is not None:
        return entry.chest_wall_left != chest_wall_left
    return False
