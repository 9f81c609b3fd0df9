"""Target-domain intensity statistics, pooled from the bank's entries.

They map engine output back to stored values in the target domain (bit depth, robust
range, background) and describe its intensity distribution (pooled histogram).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mr2nst.core.intensity import StoredRange

from .errors import BankError
from .manifest import HIST_BINS, Entry

ROBUST_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class DomainStats:
    """Intensity statistics of the target domain (unit values: brighter = denser)."""

    bits_stored: int  # the most common BitsStored of the references
    photometric: str  # the most common photometric interpretation
    low: float  # robust low of breast pixels (ROBUST_PERCENTILES[0])
    high: float  # robust high of breast pixels
    background: float  # median background value
    histogram: tuple[float, ...]  # pooled density of breast pixels over [0, 1], HIST_BINS bins
    count: int  # number of references

    @property
    def stored_range(self) -> StoredRange:
        """The full stored range of the target bit depth (brighter = denser)."""
        return StoredRange.full(self.bits_stored)


def histogram_of(values: npt.NDArray[np.floating]) -> tuple[int, ...]:
    counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=HIST_BINS, range=(0.0, 1.0))
    return tuple(int(c) for c in counts)


def _percentile(cdf: npt.NDArray[np.float64], q: float) -> float:
    index = int(np.searchsorted(cdf, q / 100.0))
    return (min(index, HIST_BINS - 1) + 0.5) / HIST_BINS


def domain_stats(entries: Sequence[Entry]) -> DomainStats:
    """Pool the entries' statistics; BankError when the bank is empty."""
    if not entries:
        raise BankError("the bank is empty: add target-domain references with `mr2nst bank add`")
    counts = np.sum([np.asarray(e.histogram, dtype=np.float64) for e in entries], axis=0)
    density = counts / max(1.0, counts.sum())
    cdf = np.cumsum(density)
    return DomainStats(
        bits_stored=Counter(e.bits_stored for e in entries).most_common(1)[0][0],
        photometric=Counter(e.photometric for e in entries).most_common(1)[0][0],
        low=_percentile(cdf, ROBUST_PERCENTILES[0]),
        high=_percentile(cdf, ROBUST_PERCENTILES[1]),
        background=float(np.median([e.background for e in entries])),
        histogram=tuple(float(d) for d in density),
        count=len(entries),
    )
