"""Tests of how the scales are merged: bands, detail mode, Gaussian low-pass (mr2nst.core.merge)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mr2nst.core.merge import band_sigmas, gaussian_blur, merge_inputs, with_detail_of
from mr2nst.core.refiner import Refiner


def _texture(seed: int, shape: tuple[int, int] = (40, 56)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random(shape).astype(np.float32))


def test_bands_of_identical_scales_merge_back_to_the_input() -> None:
    """merge = "bands" of three identical scales, through the untrained refiner, is the input."""
    image = _texture(0)
    inputs = merge_inputs(torch.stack([image] * 3), "bands", (3.0, 1.5))
    merged = Refiner(3)(inputs[None])[0, 0]
    torch.testing.assert_close(merged, image, atol=1e-5, rtol=0)


def test_bands_take_each_band_from_its_own_scale() -> None:
    """The low band comes from scale 0 and the finest detail from scale 1 only."""
    coarse, fine = _texture(1), _texture(2)
    inputs = merge_inputs(torch.stack([coarse, fine]), "bands", (2.0,))
    merged = inputs.sum(0) / 2
    expected = gaussian_blur(coarse, 2.0) + fine - gaussian_blur(fine, 2.0)
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)


def test_average_merge_passes_the_scales_unchanged() -> None:
    """merge = "average" hands the scales to the refiner as they are."""
    scales = torch.stack([_texture(3), _texture(4)])
    assert torch.equal(merge_inputs(scales, "average", (1.0,)), scales)


def test_gaussian_blur_keeps_a_constant_and_smooths_noise() -> None:
    """The low-pass keeps a constant image (reflected borders) and lowers noise variance."""
    flat = torch.full((20, 30), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    noise = _texture(5)
    assert float(gaussian_blur(noise, 1.0).var()) < 0.3 * float(noise.var())
    assert torch.equal(gaussian_blur(noise, 0.0), noise)


def test_detail_mode_takes_the_low_band_from_the_start() -> None:
    """with_detail_of keeps the start's low band and the merged image's detail."""
    merged, start = _texture(6), _texture(7)
    out = with_detail_of(merged, start, 1.5)
    torch.testing.assert_close(
        out - (merged - gaussian_blur(merged, 1.5)), gaussian_blur(start, 1.5)
    )
    assert torch.equal(with_detail_of(merged, start, 0.0), merged)


def test_band_sigmas_follow_each_scales_resolution() -> None:
    """A tile 4x the patch size gets a 4x wider band boundary; the last scale none."""
    assert band_sigmas([512, 256, 128], 128) == pytest.approx((3.0, 1.5))
    assert band_sigmas([100, 60], 128) == pytest.approx((0.75,))


def test_merge_refuses_bad_arguments() -> None:
    """An unknown merge or a wrong number of sigmas is a clear error."""
    scales = torch.stack([_texture(8)] * 3)
    with pytest.raises(ValueError, match="merge"):
        merge_inputs(scales, "median", (1.0, 1.0))
    with pytest.raises(ValueError, match="sigmas"):
        merge_inputs(scales, "bands", (1.0,))


def test_high_pass_view_ignores_the_tone() -> None:
    """Detail mode sees x - L(x) + 1/2: a brightness offset changes nothing, a texture does."""
    from mr2nst.core.features import build_features
    from mr2nst.core.merge import HighPassView

    view = HighPassView(build_features("seeded-random", "avg"), 1.0)
    texture = _texture(9, (32, 32))[None, None] * 0.2 + 0.3
    base = view(texture, ("relu1_1",))["relu1_1"]
    brighter = view(texture + 0.2, ("relu1_1",))["relu1_1"]
    torch.testing.assert_close(brighter, base, atol=1e-5, rtol=1e-5)
    other = view(_texture(10, (32, 32))[None, None] * 0.2 + 0.3, ("relu1_1",))["relu1_1"]
    assert not torch.allclose(other, base, atol=1e-3)
