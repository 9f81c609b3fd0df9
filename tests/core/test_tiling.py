"""Tests of tiles over the native image, feathered stitching and patch shapes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mr2nst.core.tiling import (
    patch_shape,
    stitch,
    tile_is_background,
    tiles_for,
    window,
)

SHAPES = [(2294, 1914), (300, 200), (200, 300), (97, 131)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g", [1, 2, 3, 4])
def test_tiles_cover_every_pixel_and_windows_sum_to_one(shape: tuple[int, int], g: int) -> None:
    """g×g tiles stay inside the image, cover it, and their windows sum to 1 (all positive)."""
    tiles = tiles_for(shape, g, 0.125)
    assert len(tiles) == g * g
    total = torch.zeros(shape, dtype=torch.float64)
    for t in tiles:
        assert 0 <= t.y0 < t.y1 <= shape[0] and 0 <= t.x0 < t.x1 <= shape[1]
        w = window(t)
        assert w.shape == t.shape and bool((w > 0).all()) and bool((w <= 1).all())
        total[t.slices] += w
    assert torch.allclose(total, torch.ones(shape, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g", [1, 2, 4])
def test_stitching_unchanged_crops_gives_back_the_image(shape: tuple[int, int], g: int) -> None:
    """stitch() of each tile's own crop reproduces the input (float tolerance)."""
    image = torch.rand(shape, generator=torch.Generator().manual_seed(g))
    tiles = tiles_for(shape, g, 0.125)
    out = stitch(tiles, [image[t.slices] for t in tiles], shape)
    assert out.dtype == torch.float32
    assert torch.allclose(out, image, atol=1e-6, rtol=0)


def test_margins_only_on_interior_edges() -> None:
    """On 2294x1914 at g=4 the cores split the sides in quarters, margins 12.5% of a tile."""
    tiles = {(t.i, t.j): t for t in tiles_for((2294, 1914), 4, 0.125)}
    my, mx = round(0.125 * 2294 / 4), round(0.125 * 1914 / 4)  # 72, 60
    assert (tiles[0, 0].margin_y, tiles[0, 0].margin_x) == (my, mx)
    assert (tiles[0, 0].y0, tiles[0, 0].y1) == (0, 574 + my)
    assert (tiles[1, 1].y0, tiles[1, 1].y1) == (574 - my, 1147 + my)
    assert (tiles[3, 3].y1, tiles[3, 3].x1) == (2294, 1914)
    assert (tiles[3, 0].x0, tiles[0, 3].y0) == (0, 0)


def test_non_square_image_gives_non_square_tiles() -> None:
    """The grid follows the aspect: tiles of a 300x200 image are 3:2 too."""
    for t in tiles_for((300, 200), 2, 0.125):
        h, w = t.shape
        assert h / w == pytest.approx(1.5, rel=0.05)


def test_no_overlap_means_plain_partition() -> None:
    """overlap=0 gives disjoint tiles with unit windows."""
    tiles = tiles_for((64, 48), 2, 0.0)
    assert sum(t.shape[0] * t.shape[1] for t in tiles) == 64 * 48
    assert all(bool((window(t) == 1).all()) for t in tiles)


def test_invalid_grids_and_overlaps_raise() -> None:
    """Too many tiles for the axis, grid < 1 and overlap >= 0.5 are refused."""
    with pytest.raises(ValueError):
        tiles_for((8, 8), 9, 0.1)
    with pytest.raises(ValueError):
        tiles_for((64, 64), 0, 0.1)
    with pytest.raises(ValueError):
        tiles_for((64, 64), 2, 0.5)


def test_patch_shape_keeps_aspect_on_multiples_of_16() -> None:
    """Longer side = patch_size, shorter side rounded to a multiple of 16, never squashed."""
    assert patch_shape((640, 640), 512) == (512, 512)
    assert patch_shape((640, 576), 512) == (512, 464)  # 460.8 -> 464
    assert patch_shape((576, 640), 512) == (464, 512)
    assert patch_shape((2294, 1914), 512) == (512, 432)  # 427.2 -> 432
    assert patch_shape((1000, 10), 64) == (64, 16)
    for shape in [(300, 200), (97, 131)]:
        ph, pw = patch_shape(shape, 256)
        assert ph % 16 == 0 and pw % 16 == 0 and max(ph, pw) == 256
        assert (ph / pw) == pytest.approx(shape[0] / shape[1], rel=0.07)


def test_same_tile_on_a_reference_of_another_size() -> None:
    """box_on maps a tile by relative coordinates; on the same shape it is the tile itself."""
    tiles = tiles_for((200, 100), 2, 0.125)
    t = tiles[3]  # bottom-right
    assert t.box_on((200, 100)) == t.slices
    ys, xs = t.box_on((400, 300))
    assert (ys.start, ys.stop) == (2 * t.y0, 400) and (xs.start, xs.stop) == (3 * t.x0, 300)
    whole = tiles_for((200, 100), 1, 0.125)[0]
    assert whole.box_on((37, 51)) == (slice(0, 37), slice(0, 51))
    assert whole.relative() == (0.0, 1.0, 0.0, 1.0)


def test_tile_is_background_threshold() -> None:
    """A tile is background below the breast fraction threshold."""
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, :1] = True  # 1%
    assert tile_is_background(mask, 0.02)
    mask[0, :3] = True  # 3%
    assert not tile_is_background(mask, 0.02)
    assert tile_is_background(np.zeros((0, 0), dtype=bool), 0.02)


def test_stitch_rejects_mismatched_outputs() -> None:
    """An output of the wrong shape or a missing output is an error."""
    tiles = tiles_for((32, 32), 2, 0.125)
    with pytest.raises(ValueError):
        stitch(tiles, [torch.zeros(3, 3)] * 4, (32, 32))
    with pytest.raises(ValueError):
        stitch(tiles[:3], [torch.zeros(t.shape) for t in tiles], (32, 32))


def test_tile_is_hashable_and_frozen() -> None:
    """Tiles are frozen dataclasses (usable as dict keys)."""
    t = tiles_for((32, 32), 1, 0.125)[0]
    assert {t: 1}[t] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.i = 1
