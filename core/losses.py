"""The mr2NST losses (METHOD.md, "Losses") as small modules with buffered targets.

Every loss returns one value *per sample* (shape ``(N,)``): the engine optimises a batch
of independent tiles at once, and summing per-tile losses keeps each tile's gradient its
own. All arithmetic is float32, also when the features come from a bf16/fp16 forward.

- Gram: ``G = F Fᵀ / M`` per sample, ``M = H·W`` (N_l × N_l, "FᵀF" in METHOD's notation
  with F laid out as M × N_l).
- Content: ``1/(N·M) Σ (F(x̂) − F(x_C))²``, the mean squared error at relu4_2.
- Style, per layer: ``E_l = 1/(4 N_l²) Σ (G(x̂) − G_target)²``.
- Total: ``content + α · mean_l E_l`` over relu1_1..relu5_1 (equal weights w_l = 1/5).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .features import CONTENT_LAYER


def gram(features: Tensor) -> Tensor:
    """Per-sample Gram matrices ``(N, C, C)`` of ``(N, C, H, W)`` features, divided by H·W."""
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
        g = gram(features)
        c = g.shape[-1]
        return (g - self.target).square().sum(dim=(1, 2)) / (4.0 * c * c)


class TransferLoss(nn.Module):
    """``content + α · mean over style layers``, per sample, from a dict of named features."""

    def __init__(
        self,
        content_target: Tensor,
        style_targets: Mapping[str, Tensor],
        alpha: float,
        content_layer: str = CONTENT_LAYER,
    ) -> None:
        super().__init__()
        if not style_targets:
            raise ValueError("at least one style layer is required")
        self.content_layer = content_layer
        self.alpha = float(alpha)
        self.content = ContentLoss(content_target)
        self.style = nn.ModuleDict({k: StyleLoss(v) for k, v in style_targets.items()})

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer the loss reads (style layers then the content layer)."""
        return (*self.style.keys(), self.content_layer)

    def parts(self, features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per-sample (content, style) losses; style is the mean over its layers."""
        content = self.content(features[self.content_layer])
        terms = [module(features[name]) for name, module in self.style.items()]
        style = torch.stack(terms).mean(dim=0)
        return content, style

    def forward(self, features: Mapping[str, Tensor]) -> Tensor:
        content, style = self.parts(features)
        return content + self.alpha * style

