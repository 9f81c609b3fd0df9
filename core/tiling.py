"""Tiles over the native image, feathered stitching and patch shapes (METHOD.md, Normative).

**Grid.** Scale ``k`` uses a ``g × g`` grid over the *native* image. Along an axis of
length ``L`` the core of tile ``i`` is ``[round(i·L/g), round((i+1)·L/g))``; interior edges
get a margin ``m = round(overlap · L/g)`` on each side, edges on the image border none.
A non-square image gives non-square tiles: the grid follows the aspect ratio.

**Blending.** Each tile is weighted by the outer product of two 1-D windows. On an
interior edge the window is a raised-cosine ramp over the ``2m`` pixels shared with the
neighbour (sampled at pixel centres, so never 0), elsewhere it is 1. Neighbouring ramps
are complementary, so the windows sum to 1 everywhere and :func:`stitch` of unchanged
crops gives back the image (up to float rounding).

**Patch shape.** A tile is resized, keeping its aspect, to a patch whose longer side is
``patch_size`` and whose shorter side is rounded to a multiple of 16 (VGG19's four
poolings), at least 16; the rounding changes the aspect by at most 8 px in ``patch_size``.

**References.** :meth:`Tile.box_on` maps a tile by relative coordinates onto an image of
another size, so that tile (k, i, j) of each reference lines up with the content's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

PATCH_MULTIPLE = 16


def _round(x: float) -> int:
    """Round half up (Python's round() is half-to-even)."""
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class Tile:
    """Tile (i, j) (row, column) of the ``grid × grid`` grid of scale ``scale``.

    ``y0:y1, x0:x1`` is the tile on the ``height × width`` image it was made for, margins
    included; ``margin_y``/``margin_x`` are the margins of its interior edges.
    """

    scale: int
    i: int
    j: int
    y0: int
    y1: int
    x0: int
    x1: int
    grid: int
    height: int
    width: int
    margin_y: int
    margin_x: int

    @property
    def shape(self) -> tuple[int, int]:
        """The tile's (h, w) on the native image, overlap margins included."""
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def slices(self) -> tuple[slice, slice]:
        """The tile's (rows, columns) on the native image."""
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def relative(self) -> tuple[float, float, float, float]:
        """``(y0, y1, x0, x1)`` as fractions of the image height and width."""
        return (
            self.y0 / self.height,
            self.y1 / self.height,
            self.x0 / self.width,
            self.x1 / self.width,
        )

    def box_on(self, shape: tuple[int, int]) -> tuple[slice, slice]:
        """The same tile, in relative coordinates, on an image of ``shape`` (at least 1 px)."""
        h, w = shape
        ry0, ry1, rx0, rx1 = self.relative()
        y0, x0 = min(_round(ry0 * h), h - 1), min(_round(rx0 * w), w - 1)
        y1, x1 = max(_round(ry1 * h), y0 + 1), max(_round(rx1 * w), x0 + 1)
        return (slice(y0, y1), slice(x0, x1))


def _axis(length: int, g: int, overlap: float) -> tuple[list[tuple[int, int]], int]:
    """Spans (start, stop) of ``g`` tiles along an axis, and the margin."""
    bounds = [_round(k * length / g) for k in range(g + 1)]
    smallest = min(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    if smallest < 1:
        raise ValueError(f"a {g}x{g} grid does not fit an axis of {length} px")
    margin = _round(overlap * length / g) if g > 1 else 0
    if 2 * margin > smallest:
        raise ValueError(
            f"overlap {overlap} gives a {margin} px margin, too wide for {smallest} px tiles"
        )
    spans = [
        (bounds[k] - (margin if k > 0 else 0), bounds[k + 1] + (margin if k < g - 1 else 0))
        for k in range(g)
    ]
    return spans, margin


def tiles_for(shape: tuple[int, int], g: int, overlap: float, scale: int = 0) -> list[Tile]:
    """The ``g × g`` tiles of an image of ``shape`` (H, W), row-major.

    Args:
        shape: the native image's (H, W).
        g: tiles per side.
        overlap: the interior edges' margin, as a fraction of the tile (see module doc).
        scale: the scale index stamped into each :class:`Tile`.

    Raises:
        ValueError: ``g`` < 1, ``overlap`` outside [0, 0.5), or a grid or margin that does
            not fit the image.
    """
    if g < 1:
        raise ValueError(f"grid must be >= 1, got {g}")
    if not 0.0 <= overlap < 0.5:
        raise ValueError(f"overlap must be in [0, 0.5), got {overlap}")
    h, w = shape
    rows, my = _axis(h, g, overlap)
    cols, mx = _axis(w, g, overlap)
    return [
        Tile(scale, i, j, y0, y1, x0, x1, g, h, w, my, mx)
        for i, (y0, y1) in enumerate(rows)
        for j, (x0, x1) in enumerate(cols)
    ]


def _ramp_window(length: int, ramp_lo: int, ramp_hi: int) -> Tensor:
    """1 in the middle, raised-cosine ramps of ``ramp_lo``/``ramp_hi`` px at the ends."""
    w = torch.ones(length, dtype=torch.float64)
    if ramp_lo:
        t = (torch.arange(ramp_lo, dtype=torch.float64) + 0.5) / ramp_lo
        w[:ramp_lo] = 0.5 - 0.5 * torch.cos(math.pi * t)
    if ramp_hi:
        t = (torch.arange(ramp_hi, dtype=torch.float64) + 0.5) / ramp_hi
        w[length - ramp_hi :] = 0.5 + 0.5 * torch.cos(math.pi * t)
    return w


def window(tile: Tile) -> Tensor:
    """The tile's feathering weights, float64 ``tile.shape``, positive everywhere."""
    h, w = tile.shape
    last = tile.grid - 1
    wy = _ramp_window(h, 2 * tile.margin_y * (tile.i > 0), 2 * tile.margin_y * (tile.i < last))
    wx = _ramp_window(w, 2 * tile.margin_x * (tile.j > 0), 2 * tile.margin_x * (tile.j < last))
    return wy[:, None] * wx[None, :]


def stitch(tiles: Sequence[Tile], outputs: Sequence[Tensor], shape: tuple[int, int]) -> Tensor:
    """Σ window·tile / Σ window over ``tiles`` -> float32 ``shape`` on the outputs' device.

    Args:
        tiles: the tiles, in any order.
        outputs: one ``tile.shape`` tensor per tile, at native size.
        shape: the image's (H, W).

    Raises:
        ValueError: not one output per tile, an output of the wrong shape, or tiles that
            leave a pixel uncovered.
    """
    if len(tiles) != len(outputs) or not tiles:
        raise ValueError(f"need one output per tile, got {len(outputs)} for {len(tiles)}")
    device = outputs[0].device
    acc = torch.zeros(shape, dtype=torch.float64, device=device)
    weight = torch.zeros(shape, dtype=torch.float64, device=device)
    for tile, out in zip(tiles, outputs, strict=True):
        if tuple(out.shape) != tile.shape:
            raise ValueError(f"tile {tile.i},{tile.j}: output {tuple(out.shape)} != {tile.shape}")
        win = window(tile).to(device)
        acc[tile.slices] += win * out.to(torch.float64)
        weight[tile.slices] += win
    if not bool((weight > 0).all()):
        raise ValueError("tiles do not cover the image")
    return (acc / weight).to(torch.float32)


def patch_shape(tile_shape: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Resize target for a tile: longer side ``patch_size``, aspect kept (see module doc)."""
    h, w = tile_shape
    long_side, short_side = max(h, w), min(h, w)
    short = max(
        PATCH_MULTIPLE,
        _round(patch_size * short_side / long_side / PATCH_MULTIPLE) * PATCH_MULTIPLE,
    )
    short = min(short, patch_size)
    return (patch_size, short) if h >= w else (short, patch_size)


def tile_is_background(mask_crop: npt.NDArray[np.bool_], threshold: float) -> bool:
    """True when less than ``threshold`` of the crop is breast (mask True)."""
    if mask_crop.size == 0:
        return True
    return float(np.count_nonzero(mask_crop)) / mask_crop.size < threshold


def resize_patch(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of ``(B, 1, h, w)`` to ``size``."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def crop_tiles(
    image: Tensor, tiles: Sequence[Tile], size: tuple[int, int], same_grid: bool = True
) -> Tensor:
    """The ``tiles`` cut from the (H, W) ``image`` and resized to ``size``: ``(B, 1, *size)``.

    ``same_grid`` (the content and images of its shape) cuts each tile's native box; a
    reference of another shape is cut by the tile's relative coordinates instead."""
    h, w = image.shape
    boxes = [t.slices if same_grid else t.box_on((h, w)) for t in tiles]
    return torch.cat([resize_patch(image[box][None, None], size) for box in boxes])
