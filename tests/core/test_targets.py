"""Tests of the multi-reference Gram target and its exact histogram specification."""

from __future__ import annotations

import torch

from mr2nst.core.losses import gram
from mr2nst.core.targets import multi_reference_target, quantile_indices, specify_histogram


def _grams(n: int, c: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.rand(*batch, n, c, 6, 5, generator=gen)
    grams: torch.Tensor = gram(feats.reshape(-1, c, 6, 5)).reshape(*batch, n, c, c)
    return grams


def test_quantile_indices_nearest_rank_half_up() -> None:
    """Rank r of Q gets pooled index round(r·(P−1)/(Q−1)), half up, ends pinned."""
    assert quantile_indices(4, 12).tolist() == [0, 4, 7, 11]  # 0, 3.67, 7.33, 11
    assert quantile_indices(3, 5).tolist() == [0, 2, 4]
    assert quantile_indices(2, 4).tolist() == [0, 3]
    assert quantile_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert quantile_indices(3, 2).tolist() == [0, 1, 1]  # 0, 0.5 -> 1 (half up), 1


def test_single_reference_gives_its_own_gram_exactly() -> None:
    """With one reference the max is that Gram, and its own quantiles give it back."""
    g = _grams(1, 8, seed=0)
    assert torch.equal(multi_reference_target(g), g[0])


def test_specification_is_exact() -> None:
    """The output's sorted entries are exactly the chosen quantiles of the pooled entries."""
    grams = _grams(5, 8, seed=1)
    target = multi_reference_target(grams)
    pooled = torch.sort(grams.flatten()).values
    chosen = pooled[quantile_indices(64, 5 * 64)]
    assert torch.equal(torch.sort(target.flatten()).values, chosen)
    assert target.min() == pooled[0] and target.max() == pooled[-1]


def test_rank_order_of_the_max_gram_is_preserved() -> None:
    """Entries keep the (stable) rank order of the element-wise max G'."""
    grams = _grams(3, 8, seed=2)
    g_max = grams.amax(dim=0).flatten()
    target = multi_reference_target(grams).flatten()
    order = torch.argsort(g_max, stable=True)
    assert bool((target[order].diff() >= 0).all())
    # Strictly larger in G' never becomes smaller in the target.
    bigger = g_max[:, None] > g_max[None, :]
    assert bool((target[:, None] >= target[None, :])[bigger].all())


def test_ties_are_broken_in_row_major_order() -> None:
    """Equal entries of G' receive increasing quantiles in row-major order."""
    values = torch.zeros(1, 4)
    reference = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert specify_histogram(values, reference).tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_target_differs_from_plain_max() -> None:
    """Specification deflates the element-wise max towards the pooled distribution."""
    grams = _grams(4, 8, seed=3)
    target, g_max = multi_reference_target(grams), grams.amax(dim=0)
    assert not torch.equal(target, g_max)
    assert target.sum() <= g_max.sum()


def test_batched_over_tiles_equals_per_tile() -> None:
    """(T, n, C, C) gives each tile the target of its own references."""
    grams = _grams(3, 6, seed=4, batch=(4,))
    batched = multi_reference_target(grams)
    assert batched.shape == (4, 6, 6)
    for t in range(4):
        assert torch.equal(batched[t], multi_reference_target(grams[t]))
