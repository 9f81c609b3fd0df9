"""The CycleGAN baseline's networks (issue 15): a local U-Net generator and a PatchGAN.

The generators must run on full-resolution mammograms tile by tile and give what one
untiled run gives (:mod:`mr2nst.core.halo`), so they have no global operation: no
instance normalization (the usual CycleGAN ResNet generator normalizes over the whole
image, which a tile cannot see) and no reflection padding that a tile border would turn
into different data. Each is a U-Net of ``depth`` stride-2 levels with ``width``
channels at full resolution, ``blocks`` residual blocks at the lowest level, and a
residual output on its input. The discriminators (70×70 PatchGAN, Isola et al. 2017) only
ever see training crops, so they keep instance normalization.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from .errors import EngineConfigError
from .halo import padded_shape, tiled_forward, unet_halo
from .unet import ResidualUNet, check_unet

#: Bumped when the networks change (part of every checkpoint).
CYCLEGAN_REVISION = 1


@dataclass(frozen=True)
class GeneratorConfig:
    """A generator's architecture and inference tile (recorded in the checkpoint)."""

    width: int = 16
    depth: int = 2
    blocks: int = 2
    tile: int = 512

    def __post_init__(self) -> None:
        check_unet("cyclegan", self.width, self.depth, self.tile)
        if not 0 <= self.blocks <= 9:
            raise EngineConfigError(f"cyclegan.blocks: must be 0..9, got {self.blocks}")

    @property
    def stride(self) -> int:
        """The total downsampling: tiles are aligned to it."""
        return int(2**self.depth)

    @property
    def halo(self) -> int:
        """Context each side of a tile: the receptive radius rounded up to the stride."""
        return unet_halo(self.depth, bottom_convs=1 + 2 * self.blocks)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return asdict(self)


class Generator(ResidualUNet):
    """``(N, 1, H, W)`` -> ``(N, 1, H, W)`` with H, W multiples of ``2**depth``; the
    untrained generator is the identity (zero-initialised head)."""

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__(1, config.width, config.depth, config.blocks)
        self.config = config


class PatchDiscriminator(nn.Module):
    """The 70×70 PatchGAN: ``(N, 1, H, W)`` -> a map of real/fake logits (LSGAN targets)."""

    def __init__(self, width: int = 32, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for n in range(1, layers + 1):
            out = width * min(2**n, 8)
            stride = 2 if n < layers else 1
            blocks += [
                nn.Conv2d(channels, out, 4, stride, 1),
                nn.InstanceNorm2d(out, affine=True),
                nn.LeakyReLU(0.2),
            ]
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def run_generator(
    generator: Generator,
    image: npt.NDArray[np.float32],
    *,
    tile: int | None = None,
    device: str = "cpu",
) -> npt.NDArray[np.float32]:
    """The generator's output for an image in [0, 1] of any size, tiled with its halo.

    Returns:
        ``(H, W)`` float32, not clipped (the method's intensity mapping follows).
    """
    cfg = generator.config
    tile = tile or cfg.tile
    if tile % cfg.stride:
        raise EngineConfigError(f"cyclegan.tile: must be a multiple of {cfg.stride}, got {tile}")
    h, w = image.shape
    hp, wp = padded_shape((h, w), cfg.stride)
    inputs = torch.zeros((1, hp, wp))
    inputs[0, :h, :w] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    out = tiled_forward(generator, inputs, tile=tile, halo=cfg.halo, device=device)
    return out[:h, :w]
