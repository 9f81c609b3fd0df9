"""Running a local convolutional network on an image of any size, tile by tile with a halo.

A network without global operations (no instance normalization, no pooling over the
image) gives each output pixel from the inputs within its receptive radius. Run on tiles
that overlap by that radius (the *halo*), aligned to the network's total stride, and
stitched, it gives exactly what one untiled run gives, at a bounded memory cost. The fast
student and the CycleGAN generator both run this way.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn


def padded_shape(shape: tuple[int, int], stride: int) -> tuple[int, int]:
    """``shape`` rounded up to multiples of ``stride``."""
    return (-(-shape[0] // stride) * stride, -(-shape[1] // stride) * stride)


def unet_halo(depth: int, bottom_convs: int = 1) -> int:
    """The receptive radius of the project's U-Nets, rounded up to their stride.

    Two 3×3 convolutions at full resolution; per level a stride-2 convolution and a
    convolution going down and one going up; ``bottom_convs`` counts the lowest level's
    convolutions, its stride-2 one included.
    """
    stride: int = 1 << depth
    radius = 2 + sum(3 << level for level in range(1, depth + 1))
    radius += max(0, bottom_convs - 1) * stride
    radius += 2  # the full-resolution convolution after the last upsampling, and slack
    return -(-radius // stride) * stride


def tiles(size: int, tile: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the tiles that cover ``0..size``."""
    for start in range(0, size, tile):
        yield start, min(size, start + tile)


@torch.inference_mode()
def tiled_forward(
    net: nn.Module, inputs: Tensor, *, tile: int, halo: int, device: str = "cpu"
) -> npt.NDArray[np.float32]:
    """``net``'s one-channel output for ``inputs`` ``(C, H, W)``, tile by tile.

    ``H``, ``W``, ``tile`` and ``halo`` must be multiples of the network's stride (pad the
    inputs first, :func:`padded_shape`), so that every tile sees the stride grid of the
    whole image.
    """
    hp, wp = inputs.shape[-2:]
    out = np.empty((hp, wp), dtype=np.float32)
    for y0, y1 in tiles(hp, tile):
        for x0, x1 in tiles(wp, tile):
            ry0, rx0 = max(0, y0 - halo), max(0, x0 - halo)
            ry1, rx1 = min(hp, y1 + halo), min(wp, x1 + halo)
            region = inputs[None, :, ry0:ry1, rx0:rx1].to(device)
            pred = net(region)[0, 0].float().cpu().numpy()
            out[y0:y1, x0:x1] = pred[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0]
    return out
