"""Tests of the mr2NST losses against hand computations (mr2nst.core.losses)."""

from __future__ import annotations

import pytest
import torch

from mr2nst.core.losses import ContentLoss, StyleLoss, TransferLoss, gram

# One sample, two channels of 2x2: F = [[1, 2], [3, 4]] and [[0, 1], [1, 0]].
F1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])
# G = F Fᵀ / (H·W): (1+4+9+16)/4, (0+2+3+0)/4, (0+1+1+0)/4
G1 = torch.tensor([[[7.5, 1.25], [1.25, 0.5]]])


def test_gram_by_hand() -> None:
    """The Gram of a 1x2x2x2 map is F Fᵀ divided by M = H·W = 4."""
    assert torch.equal(gram(F1), G1)


def test_gram_is_per_sample_and_float32() -> None:
    """A batch gives one Gram per sample, in float32 also for bf16 features."""
    batch = torch.cat([F1, 2 * F1])
    g = gram(batch.to(torch.bfloat16))
    assert g.dtype == torch.float32 and g.shape == (2, 2, 2)
    assert torch.equal(g[1], 4 * G1[0])


def test_style_loss_by_hand() -> None:
    """E = Σ(G − T)² / (4 N²): against a zero target, (7.5² + 2·1.25² + 0.5²) / 16."""
    loss = StyleLoss(torch.zeros(2, 2))(F1)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx((7.5**2 + 2 * 1.25**2 + 0.5**2) / 16)
    assert StyleLoss(G1[0])(F1).item() == 0.0


def test_style_loss_one_target_per_sample() -> None:
    """A (N, C, C) target gives each sample its own loss."""
    targets = torch.stack([G1[0], torch.zeros(2, 2)])
    loss = StyleLoss(targets)(torch.cat([F1, F1]))
    assert loss[0].item() == 0.0
    assert loss[1].item() == pytest.approx(59.625 / 16)


def test_style_target_is_a_buffer() -> None:
    """The target travels with the module (state_dict, .to()) and needs no gradient."""
    module = StyleLoss(G1[0])
    assert "target" in dict(module.named_buffers())
    assert not module.target.requires_grad


def test_content_loss_by_hand() -> None:
    """Per-sample mean squared error: 1/(N·M) Σ (F − P)²."""
    target = torch.zeros_like(F1)
    loss = ContentLoss(target)(torch.cat([F1, torch.zeros_like(F1)]).requires_grad_())
    # (1+4+9+16+0+1+1+0) / 8
    assert loss.detach().tolist() == [32 / 8, 0.0]


def test_transfer_loss_is_content_plus_alpha_times_mean_style() -> None:
    """total = content + α · mean over the style layers."""
    feats = {"relu1_1": F1, "relu2_1": 2 * F1, "relu4_2": F1}
    loss = TransferLoss(
        content_target=torch.zeros_like(F1),
        style_targets={"relu1_1": torch.zeros(2, 2), "relu2_1": torch.zeros(2, 2)},
        alpha=10.0,
    )
    style1 = 59.625 / 16
    style2 = 16 * style1  # the Gram scales with the square of the features
    content, style = loss.parts(feats)
    assert content.item() == pytest.approx(4.0)
    assert style.item() == pytest.approx((style1 + style2) / 2)
    assert loss(feats).item() == pytest.approx(4.0 + 10.0 * (style1 + style2) / 2)
    assert loss.layers == ("relu1_1", "relu2_1", "relu4_2")


def test_style_loss_gradient_matches_autograd_free_formula() -> None:
    """dE/dF = (G − T) F · 4 / (4 N² M) for a symmetric target (a check of the scaling)."""
    f = F1.clone().requires_grad_()
    target = torch.eye(2)
    StyleLoss(target)(f).sum().backward()
    g = gram(F1)[0] - target
    flat = F1[0].reshape(2, 4)
    expected = (4 * g @ flat / (4 * 4 * 4)).reshape(1, 2, 2, 2)
    assert f.grad is not None and torch.allclose(f.grad, expected)


def test_histogram_loss_by_hand() -> None:
    """Risser's loss: each channel's values are replaced rank by rank by the sorted target."""
    from mr2nst.core.losses import HistogramLoss

    feats = torch.tensor([[[[3.0, 1.0], [2.0, 0.0]]]])  # one channel: 3, 1, 2, 0
    target = torch.tensor([[[10.0, 20.0, 30.0, 40.0]]])  # sorted target activations
    # ranks: 0 -> 10, 1 -> 20, 2 -> 30, 3 -> 40: matched [40, 20, 30, 10]
    expected = ((3 - 40) ** 2 + (1 - 20) ** 2 + (2 - 30) ** 2 + (0 - 10) ** 2) / 4
    assert HistogramLoss(target)(feats).item() == pytest.approx(expected)
    assert HistogramLoss(torch.tensor([[[0.0, 1.0, 2.0, 3.0]]]))(feats).item() == 0.0


def test_transfer_loss_levers_by_hand() -> None:
    """Two content layers add, style weights weight the mean, the pixel term pulls to x0."""
    feats = {"relu1_1": F1, "relu2_1": 2 * F1, "relu4_2": F1}
    image = torch.ones(1, 1, 2, 2)
    loss = TransferLoss(
        content_target={"relu1_1": torch.zeros_like(F1), "relu4_2": torch.zeros_like(F1)},
        style_targets={"relu1_1": torch.zeros(2, 2), "relu2_1": torch.zeros(2, 2)},
        alpha=10.0,
        style_weights={"relu1_1": 2.0, "relu2_1": 0.0},
        pixel_target=torch.zeros(1, 1, 2, 2),
        pixel_weight=3.0,
    )
    style1 = 59.625 / 16
    content, style = loss.parts(feats)
    assert content.item() == pytest.approx(8.0)
    assert style.item() == pytest.approx(2.0 * style1 / 2)
    assert loss(feats, image).item() == pytest.approx(8.0 + 10.0 * style1 + 3.0)
    with pytest.raises(ValueError, match="pixel"):
        loss(feats)
