"""The local residual U-Net shared by the fast student and the CycleGAN generator.

``depth`` stride-2 levels, ``width`` channels at full resolution (doubling per level),
``blocks`` residual blocks at the lowest level, and a 1×1 head, zero-initialised, whose
output is added to the first input channel: untrained, the network is the identity on
its image. No operation is global (no instance normalization, zero padding only), so it
runs tiled with a halo (:mod:`mr2nst.core.halo`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from .errors import EngineConfigError


def check_unet(section: str, width: int, depth: int, tile: int) -> None:
    """The bounds every U-Net setting shares; errors name ``section.key``.

    Raises:
        EngineConfigError: width outside 4..128, depth outside 1..4, or a tile under 64 or
            not a multiple of ``2**depth``.
    """
    if not 4 <= width <= 128:
        raise EngineConfigError(f"{section}.width: must be 4..128, got {width}")
    if not 1 <= depth <= 4:
        raise EngineConfigError(f"{section}.depth: must be 1..4, got {depth}")
    stride = 2**depth
    if tile < 64 or tile % stride:
        raise EngineConfigError(
            f"{section}.tile: must be >= 64 and a multiple of {stride}, got {tile}"
        )


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU())


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(channels, channels), nn.Conv2d(channels, channels, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = F.relu(x + self.body(x))
        return out


class ResidualUNet(nn.Module):
    """``(N, in_channels, H, W)`` -> ``(N, 1, H, W)``, H and W multiples of ``2**depth``:
    the first input channel plus the predicted residual."""

    def __init__(self, in_channels: int, width: int, depth: int, blocks: int = 0) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(in_channels, w), _conv(w, w))
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in range(depth):
            cin, cout = w * 2**level, w * 2 ** (level + 1)
            self.down.append(nn.Sequential(_conv(cin, cout, stride=2), _conv(cout, cout)))
            self.up.append(_conv(cout + cin, cin))
        self.bottom = nn.Sequential(*(_Residual(w * 2**depth) for _ in range(blocks)))
        self.head = nn.Conv2d(w, 1, 1)
        nn.init.zeros_(self.head.weight)  # untrained: the output is the input image itself
        assert self.head.bias is not None
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """The first input channel plus the predicted residual."""
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = self.bottom(skips.pop())
        for up in reversed(self.up):
            skip = skips.pop()
            y = up(torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), skip], 1))
        residual: Tensor = self.head(y)
        return x[:, :1] + residual
