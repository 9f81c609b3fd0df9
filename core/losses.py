"""The mr2NST losses (METHOD.md, "Losses") as small modules with buffered targets.

Every loss returns one value *per sample* (shape ``(N,)``): the engine optimizes a batch
of independent tiles at once, and summing per-tile losses keeps each tile's gradient its
own. All arithmetic is float32, also when the features come from a bf16/fp16 forward.

- Gram: ``G = F Fᵀ / M`` per sample, ``M = H·W`` (N_l × N_l, "FᵀF" in METHOD's notation
  with F laid out as M × N_l).
- Content: ``1/(N·M) Σ (F(x̂) − F(x_C))²``, the mean squared error at relu4_2.
- Style, per layer: ``E_l = 1/(4 N_l²) Σ (G(x̂) − G_target)²``.
- Total: ``content + α · mean_l E_l`` over relu1_1..relu5_1 (equal weights w_l = 1/5).

Optional terms (engine levers; all off by default except one content layer):

- Content at several layers (shallow ones pin pixel-level structure): the sum of the
  per-layer content losses.
- Per-layer style weights: ``α · Σ_l w_l E_l / L`` (equal weights of 1 give the mean).
- Pixel term: ``λ_p · mean (x − x_0)²`` toward the start image ``x_0``.
- Feature-histogram term (Risser, Wilmot & Barnes 2017): ``λ_h · mean (F − H(F))²`` per
  histogram layer, where ``H(F)`` is ``F`` with each channel's values replaced, rank by
  rank, by the target's sorted values (exact specification, treated as a constant).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .features import CONTENT_LAYER


def gram(features: Tensor) -> Tensor:
    """Per-sample Gram matrices ``(N, C, C)`` of ``(N, C, H, W)`` features, divided by H·W.

    Computed in float32 whatever the features' dtype.

    Raises:
        ValueError: features that are not 4-D.
    """
    if features.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) features, got {tuple(features.shape)}")
    n, c, h, w = features.shape
    flat = features.float().reshape(n, c, h * w)
    return torch.bmm(flat, flat.transpose(1, 2)) / float(h * w)


class ContentLoss(nn.Module):
    """Per-sample mean squared error against buffered target features."""

    target: Tensor

    def __init__(self, target: Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target.detach().float())

    def forward(self, features: Tensor) -> Tensor:
        """The loss ``(N,)`` of ``(N, ...)`` features, in float32."""
        diff = features.float() - self.target
        return diff.square().flatten(1).mean(dim=1)


class StyleLoss(nn.Module):
    """``1/(4 N_l²) Σ (G(x̂) − G_target)²`` per sample against a buffered target Gram.

    ``target`` is ``(C, C)`` (shared by every sample) or ``(N, C, C)`` (one per tile).
    """

    target: Tensor

    def __init__(self, target: Tensor) -> None:
        super().__init__()
        if target.ndim not in (2, 3) or target.shape[-1] != target.shape[-2]:
            raise ValueError(f"expected a (C, C) or (N, C, C) Gram, got {tuple(target.shape)}")
        self.register_buffer("target", target.detach().float())

    def forward(self, features: Tensor) -> Tensor:
        """The loss ``(N,)`` of ``(N, C, H, W)`` features, in float32."""
        g = gram(features)
        c = g.shape[-1]
        return (g - self.target).square().sum(dim=(1, 2)) / (4.0 * c * c)


class PixelLoss(nn.Module):
    """Per-sample mean squared pixel difference to a buffered image (the start image)."""

    target: Tensor

    def __init__(self, target: Tensor) -> None:
        super().__init__()
        self.register_buffer("target", target.detach().float())

    def forward(self, image: Tensor) -> Tensor:
        """The loss ``(N,)`` of an ``(N, ...)`` image, in float32."""
        return (image.float() - self.target).square().flatten(1).mean(dim=1)


def specify_rows(values: Tensor, sorted_target: Tensor) -> Tensor:
    """``values`` (..., M) with each row's entries replaced rank by rank by the row of
    ``sorted_target`` (..., M, ascending): exact histogram specification, no gradient."""
    order = torch.argsort(values.detach(), dim=-1)
    return torch.empty_like(sorted_target).scatter_(-1, order, sorted_target)


class HistogramLoss(nn.Module):
    """Risser et al.'s feature-histogram loss, per sample: ``mean (F − H(F))²`` where H
    gives every channel the target's sorted activations ``(N, C, M)`` (buffered)."""

    target: Tensor

    def __init__(self, target: Tensor) -> None:
        super().__init__()
        if target.ndim != 3:
            raise ValueError(f"expected (N, C, M) sorted activations, got {tuple(target.shape)}")
        self.register_buffer("target", target.detach().float())

    def forward(self, features: Tensor) -> Tensor:
        """The loss ``(N,)`` of ``(N, C, H, W)`` features.

        Raises:
            ValueError: when ``H·W`` differs from the target's number of positions M.
        """
        flat = features.float().flatten(2)
        if flat.shape[-1] != self.target.shape[-1]:
            raise ValueError(
                f"features have {flat.shape[-1]} positions, target {self.target.shape[-1]}"
            )
        matched = specify_rows(flat, self.target)
        return (flat - matched).square().mean(dim=(1, 2))


class TransferLoss(nn.Module):
    """``content + α · weighted mean over style layers`` (+ the optional pixel and
    histogram terms), per sample, from a dict of named features."""

    def __init__(
        self,
        content_target: Tensor | Mapping[str, Tensor],
        style_targets: Mapping[str, Tensor],
        alpha: float,
        content_layer: str = CONTENT_LAYER,
        style_weights: Mapping[str, float] | None = None,
        pixel_target: Tensor | None = None,
        pixel_weight: float = 0.0,
        histogram_targets: Mapping[str, Tensor] | None = None,
        histogram_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if not style_targets:
            raise ValueError("at least one style layer is required")
        targets = (
            {content_layer: content_target}
            if isinstance(content_target, Tensor)
            else dict(content_target)
        )
        if not targets:
            raise ValueError("at least one content layer is required")
        self.alpha = float(alpha)
        self.content = nn.ModuleDict({k: ContentLoss(v) for k, v in targets.items()})
        self.style = nn.ModuleDict({k: StyleLoss(v) for k, v in style_targets.items()})
        weights = dict(style_weights or {})
        self.style_weights = {k: float(weights.get(k, 1.0)) for k in style_targets}
        self.pixel_weight = float(pixel_weight)
        self.pixel = (
            PixelLoss(pixel_target) if pixel_target is not None and pixel_weight > 0 else None
        )
        self.histogram_weight = float(histogram_weight)
        self.histogram = nn.ModuleDict(
            {k: HistogramLoss(v) for k, v in (histogram_targets or {}).items()}
            if histogram_weight > 0
            else {}
        )

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer the loss reads (style layers, then content, then histogram layers)."""
        return tuple(
            dict.fromkeys([*self.style.keys(), *self.content.keys(), *self.histogram.keys()])
        )

    @property
    def content_layer(self) -> str:
        """The first content layer (METHOD.md's relu4_2 by default)."""
        return next(iter(self.content.keys()))

    def parts(self, features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-sample (content, style) losses: content summed over its layers, style the
        weighted mean over its layers."""
        content = torch.stack([m(features[n]) for n, m in self.content.items()]).sum(dim=0)
        terms = [self.style_weights[n] * m(features[n]) for n, m in self.style.items()]
        style = torch.stack(terms).mean(dim=0)
        return content, style

    def forward(self, features: Mapping[str, Tensor], image: Tensor | None = None) -> Tensor:
        """The per-sample total ``(N,)``.

        Args:
            features: named features of the iterate, at least :attr:`layers`.
            image: the iterate itself, needed when the pixel term is on.

        Raises:
            ValueError: the pixel term is on and ``image`` is None.
        """
        content, style = self.parts(features)
        total = content + self.alpha * style
        if self.pixel is not None:
            if image is None:
                raise ValueError("the pixel term needs the image")
            total = total + self.pixel_weight * self.pixel(image)
        for name, module in self.histogram.items():
            total = total + self.histogram_weight * module(features[name])
        return total
