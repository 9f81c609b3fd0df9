"""Tests of exact histogram matching (Coltuc et al. 2006)."""

import numpy as np
import pytest

from mr2nst.core.ehm import exact_histogram_match, strict_order, target_quantiles
from mr2nst.core.errors import ImageError


def test_output_histogram_equals_target_exactly():
    """With as many target values as masked pixels, the output multiset is the target."""
    rng = np.random.default_rng(0)
    image = np.round(rng.random((40, 30)) * 15) / 15  # heavy ties: 16 levels
    mask = np.zeros((40, 30), bool)
    mask[5:35, 3:27] = True
    target = rng.beta(2, 5, size=int(mask.sum())).astype(np.float32)
    out = exact_histogram_match(image.astype(np.float32), mask, target, background=0.01)
    assert np.array_equal(np.sort(out[mask]), np.sort(target))
    assert np.all(out[~mask] == np.float32(0.01))


def test_order_is_kept_where_values_differ():
    """Pixels keep their intensity order: a brighter source pixel never gets a darker value."""
    rng = np.random.default_rng(1)
    image = rng.random((32, 32)).astype(np.float32)
    mask = np.ones_like(image, dtype=bool)
    out = exact_histogram_match(image, mask, rng.normal(size=image.size))
    order = np.argsort(image.ravel())
    assert np.all(np.diff(out.ravel()[order]) >= 0)


def test_ties_broken_by_local_means():
    """Equal pixels in a brighter neighbourhood rank above those in a darker one."""
    image = np.zeros((9, 18), np.float32)
    image[:, 9:] = 0.2  # a brighter right half
    image[4, 4] = image[4, 13] = 0.5  # two tied pixels, one in each half
    mask = np.ones_like(image, dtype=bool)
    order = strict_order(image, mask)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    assert rank[4 * 18 + 13] > rank[4 * 18 + 4]


def test_quantiles_for_other_sizes():
    """A target of another size is sampled at evenly spaced ranks, keeping its extremes."""
    q = target_quantiles(np.arange(101, dtype=np.float32), 11)
    assert np.array_equal(q, np.arange(0, 101, 10, dtype=np.float32))


def test_empty_mask_and_shape_mismatch_raise():
    """Bad inputs raise ImageError."""
    with pytest.raises(ImageError, match="empty"):
        exact_histogram_match(np.zeros((4, 4), np.float32), np.zeros((4, 4), bool), np.ones(3))
    with pytest.raises(ImageError, match="shape"):
        exact_histogram_match(np.zeros((4, 4), np.float32), np.ones((4, 5), bool), np.ones(3))
