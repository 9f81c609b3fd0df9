"""The fast student: a compact fully convolutional network that imitates the engine.

A site trains it once on its own engine's outputs (``mr2nst train-fast``) and then runs it
on every image in seconds on a CPU. It maps the engine's input (the content scaled to
[0, 1]) to the engine's output, before the tone mapping that the method applies to both.

Inputs, four channels at native resolution: the content ``c``; the breast mask; a coarse
context, ``c`` averaged over ``context``×``context`` blocks of the whole image and
upsampled again (what a tile cannot see of the rest of the breast); and white noise,
from which the network draws the grain that the engine's style loss synthesizes (a
deterministic map of ``c`` alone could only learn its average, a blur). The noise comes
from a fixed seed over the whole image, so the output is reproducible.

The network is a small U-Net (``depth`` stride-2 levels, ``width`` channels at full
resolution, doubling per level) that predicts a residual added to ``c``. It has no
global operation, so an output pixel depends only on inputs within :attr:`halo` pixels;
:func:`run_student` therefore tiles any image with that halo, aligned to the network's
stride, and the stitched result equals an untiled run (tests check ≤ 1e-4).

When the engine runs in detail mode (``detail_sigma`` σ > 0) its output is
``L_σ(start) + M − L_σ(M)``: the start image's low band, exactly, and the transfer's high
band. :func:`compose` gives the student's output the same form, so the student learns
only the high band (texture, grain and the µCs in it); the low band is the teacher's by
construction.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from .errors import EngineConfigError
from .halo import padded_shape, tiled_forward, unet_halo
from .intensity import FloatImage
from .merge import with_detail_of
from .unet import ResidualUNet, check_unet

#: Bumped when the architecture, its inputs or its output's composition change (part of
#: every checkpoint). 2: the engine's detail mode is applied to the output.
STUDENT_REVISION = 2
#: Channels of the input: content, mask, coarse context, noise.
IN_CHANNELS = 4


@dataclass(frozen=True)
class StudentConfig:
    """The student's architecture and input settings (recorded in its checkpoint).

    Attributes:
        width: channels at full resolution (doubled at each level below).
        depth: stride-2 levels (1..4); tiles are aligned to ``2**depth`` pixels.
        context: block size of the coarse context channel, in pixels.
        noise_seed: seed of the noise channel at inference.
        tile: inference tile size in pixels (a multiple of ``2**depth``).
    """

    width: int = 16
    depth: int = 2
    context: int = 32
    noise_seed: int = 0
    tile: int = 512

    def __post_init__(self) -> None:
        check_unet("fast", self.width, self.depth, self.tile)
        if self.context < 2:
            raise EngineConfigError(f"fast.context: must be >= 2, got {self.context}")

    @property
    def stride(self) -> int:
        """The network's total downsampling: tile origins and sizes are multiples of it."""
        return int(2**self.depth)

    @property
    def halo(self) -> int:
        """Pixels of context each side of a tile: the receptive radius, rounded up to the
        stride (:func:`~mr2nst.core.halo.unet_halo`)."""
        return unet_halo(self.depth)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return asdict(self)


class Student(ResidualUNet):
    """The student U-Net: ``(N, 4, H, W)`` inputs -> ``(N, 1, H, W)`` output (the content
    plus the predicted residual), with H and W multiples of ``2**depth``."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(IN_CHANNELS, config.width, config.depth)
        self.config = config

    def parameter_count(self) -> int:
        """How many weights the student has."""
        return sum(p.numel() for p in self.parameters())

    def weights_id(self) -> str:
        """A short content hash of the parameters (for provenance)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        return digest.hexdigest()[:12]


def coarse_context(content: Tensor, block: int) -> Tensor:
    """``content`` ``(1, 1, H, W)`` averaged over ``block``-pixel blocks, upsampled back."""
    h, w = content.shape[-2:]
    small = F.interpolate(
        content, size=(max(1, round(h / block)), max(1, round(w / block))), mode="area"
    )
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def student_inputs(
    content: FloatImage,
    mask: npt.NDArray[np.bool_],
    config: StudentConfig,
    noise: npt.NDArray[np.float32] | None = None,
) -> Tensor:
    """The four input channels ``(4, Hp, Wp)`` for a whole image, zero-padded at the bottom
    and right to multiples of the stride (the output is cropped back).

    Args:
        content: the content in [0, 1], ``(H, W)``.
        mask: the breast mask, ``(H, W)``.
        config: the student's settings (context block, noise seed, stride).
        noise: the noise channel ``(Hp, Wp)``; default: standard normal from ``noise_seed``.
    """
    h, w = content.shape
    hp, wp = padded_shape((h, w), config.stride)
    c = torch.zeros((1, 1, hp, wp))
    c[0, 0, :h, :w] = torch.from_numpy(np.ascontiguousarray(content, dtype=np.float32))
    m = torch.zeros((hp, wp))
    m[:h, :w] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
    if noise is None:
        noise = np.random.default_rng(config.noise_seed).standard_normal((hp, wp), np.float32)
    z = torch.from_numpy(np.ascontiguousarray(noise, dtype=np.float32))
    return torch.stack([c[0, 0], m, coarse_context(c, config.context)[0, 0], z])


def compose(output: Tensor, start: Tensor, detail_sigma: float) -> Tensor:
    """The engine's detail mode on a student output: ``L_σ(start) + output − L_σ(output)``
    (``output`` itself when σ is 0)."""
    return with_detail_of(output, start, detail_sigma)


@torch.inference_mode()
def run_student(
    student: Student,
    content: FloatImage,
    mask: npt.NDArray[np.bool_],
    *,
    tile: int | None = None,
    device: str = "cpu",
    detail_sigma: float = 0.0,
) -> FloatImage:
    """The student's output for one image, computed tile by tile with a halo.

    Args:
        student: the network (in eval mode, on ``device``).
        content: the content in [0, 1], ``(H, W)``.
        mask: the breast mask.
        tile: tile size (default the student's ``config.tile``; a multiple of the stride);
            one at least as large as the image runs it untiled.
        device: where the network runs.
        detail_sigma: the teacher engine's detail mode σ (0: off), applied to the whole
            stitched output (:func:`compose`).

    Returns:
        The output ``(H, W)``, float32 (not clipped; the method's tone mapping follows).
    """
    cfg = student.config
    tile = tile or cfg.tile
    if tile % cfg.stride:
        raise EngineConfigError(f"fast.tile: must be a multiple of {cfg.stride}, got {tile}")
    h, w = content.shape
    inputs = student_inputs(content, mask, cfg)
    out = tiled_forward(student, inputs, tile=tile, halo=cfg.halo, device=device)
    image = out[:h, :w]
    if detail_sigma > 0:
        start = inputs[0, :h, :w]
        image = compose(torch.from_numpy(np.ascontiguousarray(image)), start, detail_sigma).numpy()
    return image
