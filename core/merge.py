"""How the stitched scales become one image (METHOD.md "Multi-resolution"; issue 10).

- ``merge = "average"``: the refiner's input is the scales themselves; the untrained
  refiner is their plain average (Normative).
- ``merge = "bands"``: each scale contributes the frequency band it resolves: the low
  band from scale 0, the next from scale 1, ..., the finest detail from the last scale
  (at native resolution). With Gaussian low-passes ``L_k`` (``L_{n-1}`` = identity,
  ``L_{-1}`` = 0), band ``k`` is ``L_k(S_k) − L_{k-1}(S_k)``. The refiner mixes
  ``n · band_k``, so the untrained refiner (weights 1/n) gives ``Σ_k band_k``; for
  identical scales that sum telescopes back to the scale itself.

``L_k``'s σ follows the resolution scale k was optimized at: a tile whose longer side is
``T`` px is optimized at ``r = min(1, patch_size / T)`` of native resolution, which
resolves frequencies up to about ``r/2`` cycles per pixel; ``σ_k = BAND_SIGMA / r`` puts
the Gaussian's half-power point near ``r/4``, below the resize filter's roll-off.

``detail_sigma > 0`` (detail mode): the NST works on the high-pass layer, and the low
band comes from the start. During the optimization the feature network sees
``x − L_d(x) + 1/2`` (:class:`HighPassView`, σ_d in patch pixels), for the iterate, the
content and the references alike, so the Gram and histogram targets describe texture
and grain rather than tone; afterwards the low band ``L_d`` of the *start* image (the
EHM start when ``init = "ehm"``) replaces that of the merged result (σ_d in native
pixels): ``out = L_d(start) + (merged − L_d(merged))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: σ (native px) of the band boundary of a scale optimized at full resolution.
BAND_SIGMA = 0.75


def band_sigmas(tile_sides: Sequence[int], patch_size: int) -> tuple[float, ...]:
    """σ of the low-pass that bounds each scale's band but the last (see module doc);
    ``tile_sides[k]`` is the longest tile side of scale k in native pixels."""
    return tuple(BAND_SIGMA * max(1.0, side / patch_size) for side in tile_sides[:-1])


def gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian low-pass of ``(..., H, W)`` (reflected borders); σ 0 = identity."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(image.dtype)
    shape = image.shape
    flat = image.reshape(-1, 1, shape[-2], shape[-1])
    pad_h, pad_w = min(radius, shape[-2] - 1), min(radius, shape[-1] - 1)
    k = kernel[radius - pad_w : radius + pad_w + 1] if pad_w < radius else kernel
    out = F.conv2d(F.pad(flat, (pad_w, pad_w, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    k = kernel[radius - pad_h : radius + pad_h + 1] if pad_h < radius else kernel
    out = F.conv2d(F.pad(out, (0, 0, pad_h, pad_h), mode="reflect"), k.view(1, 1, -1, 1))
    return out.reshape(shape)


def merge_inputs(scales: Tensor, merge: str, sigmas: Sequence[float]) -> Tensor:
    """What the refiner mixes, ``(n, H, W)``, for stitched ``scales`` ``(n, H, W)``.

    Args:
        scales: the stitched scales, coarse to fine.
        merge: ``"average"`` (the scales themselves) or ``"bands"`` (``n ·`` each scale's
            band; see the module doc).
        sigmas: the ``n − 1`` low-pass σs of the bands (:func:`band_sigmas`).

    Raises:
        ValueError: an unknown ``merge``, or not ``n − 1`` sigmas for ``"bands"``.
    """
    n = scales.shape[0]
    if merge == "average":
        return scales
    if merge != "bands":
        raise ValueError(f"merge must be average or bands, got {merge!r}")
    if len(sigmas) != n - 1:
        raise ValueError(f"{n} scales need {n - 1} band sigmas, got {len(sigmas)}")
    bands = []
    for k in range(n):
        upper = scales[k] if k == n - 1 else gaussian_blur(scales[k], sigmas[k])
        lower = gaussian_blur(scales[k], sigmas[k - 1]) if k > 0 else torch.zeros_like(upper)
        bands.append(n * (upper - lower))
    return torch.stack(bands)


def with_detail_of(merged: Tensor, start: Tensor, sigma: float) -> Tensor:
    """Detail mode: ``L_σ(start) + merged − L_σ(merged)`` (``merged`` when σ is 0)."""
    if sigma <= 0:
        return merged
    return gaussian_blur(start, sigma) + merged - gaussian_blur(merged, sigma)


class HighPassView(nn.Module):
    """A feature network that sees the detail layer ``x − L_σ(x) + 1/2`` of its input
    (detail mode); otherwise it is called like :class:`~mr2nst.core.features.VGGFeatures`."""

    def __init__(self, features: nn.Module, sigma: float) -> None:
        super().__init__()
        self.features = features
        self.sigma = float(sigma)

    def forward(self, image: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        """The wrapped network's ``layers`` of ``image``'s detail layer."""
        detail = image - gaussian_blur(image, self.sigma) + 0.5
        out: dict[str, Tensor] = self.features(detail, layers)
        return out
