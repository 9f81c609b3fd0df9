"""Tests of the adversarial refiner training (mr2nst.core.lab.refiner_train)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torchvision.models import resnet18

from mr2nst.core.lab.phantom import PhantomSpec, make_case
from mr2nst.core.lab.refiner_train import (
    Discriminator,
    TrainImage,
    TrainProgress,
    TrainSettings,
    TrainState,
    batch_of,
    crop,
    generate,
    generator_loss,
    train_epoch,
    train_step,
)
from mr2nst.core.refiner import Refiner

CROP = 32


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: fast on a small shared machine, and bit-reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantoms() -> tuple[list[TrainImage], list[TrainImage]]:
    """Tiny phantom crops: GE renderings as all three scales, UIH renderings as targets."""
    sources, targets = [], []
    for seed in range(3):
        case = make_case(PhantomSpec(height=128, width=104, seed=seed))
        ge = np.stack([case.ge] * 3).astype(np.float32)
        sources.append(TrainImage.from_arrays(ge, case.mask))
        targets.append(TrainImage.from_arrays(case.uih[None].astype(np.float32), case.mask))
    return sources, targets


def _dim_and_bright() -> tuple[list[TrainImage], list[TrainImage]]:
    """An achievable case: sources are the targets' texture at 40% brightness."""
    rng = np.random.default_rng(0)
    mask = np.ones((96, 96), dtype=bool)

    def texture(scale: float) -> np.ndarray:
        return (scale * (0.2 + 0.6 * rng.random((96, 96)))).astype(np.float32)

    sources = [TrainImage.from_arrays(np.stack([texture(0.4)] * 3), mask) for _ in range(3)]
    targets = [TrainImage.from_arrays(texture(1.0)[None], mask) for _ in range(3)]
    return sources, targets


def _settings(**kw: object) -> TrainSettings:
    base: dict[str, object] = {"crop": CROP, "batch": 4, "lr_g": 1e-2, "lr_d": 1e-3, "seed": 3}
    return TrainSettings(**{**base, **kw})  # type: ignore[arg-type]


def _same(a: TrainState, b: TrainState) -> bool:
    pairs = [(a.refiner, b.refiner), (a.discriminator, b.discriminator)]
    return all(
        torch.equal(x, y)
        for m, n in pairs
        for x, y in zip(m.state_dict().values(), n.state_dict().values(), strict=True)
    )


def test_fresh_state_starts_from_the_plain_average() -> None:
    """A new run's refiner is the untrained one: the output is the mean of the scales."""
    state = TrainState.create(3, _settings())
    scales = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = state.refiner(scales)
    assert torch.allclose(out, scales.mean(dim=1, keepdim=True), atol=1e-6)
    assert state.refiner.id() == Refiner(3).id() and state.epoch == state.step == 0


def test_discriminator_takes_one_channel_and_gives_one_logit() -> None:
    """D maps (N, 1, h, w) crops to N logits."""
    assert Discriminator()(torch.rand(3, 1, CROP, CROP)).shape == (3,)


def test_imagenet_conv1_is_summed_into_one_channel() -> None:
    """Pretrained RGB conv1 weights are summed over the colour channels; fc is replaced."""
    rgb = resnet18(weights=None).state_dict()
    d = Discriminator(rgb)
    assert torch.allclose(d.net.conv1.weight, rgb["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(d.net.layer1[0].conv1.weight, rgb["layer1.0.conv1.weight"])
    assert d.net.fc.out_features == 1
    with pytest.raises(ValueError, match="resnet18"):
        Discriminator({"foo": torch.zeros(1)})


def test_crops_share_one_window_across_scales_and_sit_on_the_breast() -> None:
    """Every scale of a source is cut at the same place, centred on a breast pixel."""
    h, w = 80, 60
    ramp = np.arange(h * w, dtype=np.float32).reshape(h, w)
    mask = np.zeros((h, w), dtype=bool)
    mask[50:70, 40:55] = True
    image = TrainImage.from_arrays(np.stack([ramp, ramp + 1, ramp + 2]), mask, stride=1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        pixels, m = crop(image, CROP, gen)
        assert pixels.shape == (3, CROP, CROP) and m.shape == (1, CROP, CROP)
        assert torch.equal(pixels[1], pixels[0] + 1) and torch.equal(pixels[2], pixels[0] + 2)
        top, left = divmod(int(pixels[0, 0, 0]), w)
        assert m.any() and torch.equal(
            m[0], torch.from_numpy(mask[top : top + CROP, left : left + CROP])
        )
    with pytest.raises(ValueError, match="larger than the image"):
        crop(image, 96, gen)


@pytest.mark.slow
def test_generator_steps_lower_the_generator_loss(phantoms) -> None:
    """After D has learnt GE from UIH phantom crops, R's steps against it lower −log D(R(S))."""
    sources, targets = phantoms
    gen = torch.Generator().manual_seed(1)
    scales, mask = batch_of(sources, 8, CROP, gen)  # fixed crops to judge on
    real, _ = batch_of(targets, 8, CROP, gen)
    state = TrainState.create(3, _settings(lr_g=1e-9))
    for _ in range(8):  # phase 1: D learns, R (almost) frozen
        train_step(state, sources, targets)
    for group in state.opt_d.param_groups:  # phase 2: D frozen, R learns
        group["lr"] = 0.0
    for group in state.opt_g.param_groups:
        group["lr"] = 1e-2
    before = generator_loss(state.refiner, state.discriminator, scales, mask, real)
    for _ in range(10):
        train_step(state, sources, targets)
    after = generator_loss(state.refiner, state.discriminator, scales, mask, real)
    assert after < before
    assert state.refiner.id() != Refiner(3).id()


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="known failure since 2026-12-01 on a fresh environment (torch 2.14.1, numpy 2.4.6): "
    "30 steps move R's mean 0.20 -> 0.32 towards 0.50, not past halfway; pinning numpy 2.4.5 "
    "did not change it; under investigation (see the issue 15 closing note)",
)
def test_adversarial_training_moves_the_output_towards_the_target() -> None:
    """Plain alternating training on an achievable case brightens R's output towards the target."""
    sources, targets = _dim_and_bright()
    state = TrainState.create(3, _settings())
    seen: list[TrainProgress] = []
    means = train_epoch(state, sources, targets, steps=30, progress=seen.append)
    assert len(seen) == 30 and seen[-1].step == 30 and state.epoch == 1 and state.step == 30
    assert set(means) == {"loss_d", "loss_g", "d_real", "d_fake"} and state.history == [means]
    gen = torch.Generator().manual_seed(1)
    scales, mask = batch_of(sources, 8, CROP, gen)
    real, _ = batch_of(targets, 8, CROP, gen)
    with torch.no_grad():
        before = float(generate(Refiner(3), scales, mask).mean())
        after = float(generate(state.refiner, scales, mask).mean())
    target = float(real.mean())
    assert abs(after - target) < 0.5 * abs(before - target)
    assert np.isfinite(generator_loss(state.refiner, state.discriminator, scales, mask, real))


@pytest.mark.slow
def test_training_is_deterministic_with_a_seed(phantoms) -> None:
    """Two runs with the same seed give identical networks; another seed does not."""
    sources, targets = phantoms
    runs = []
    for seed in (5, 5, 6):
        state = TrainState.create(3, _settings(seed=seed))
        for _ in range(3):
            train_step(state, sources, targets)
        runs.append(state)
    assert _same(runs[0], runs[1])
    assert not _same(runs[0], runs[2])


@pytest.mark.slow
def test_state_round_trip_resumes_identically(phantoms) -> None:
    """Saving and restoring the state mid-run gives the same result as an uninterrupted run."""
    sources, targets = phantoms
    straight = TrainState.create(3, _settings(loss="minimax"))
    train_epoch(straight, sources, targets, steps=2)
    train_epoch(straight, sources, targets, steps=2)

    first = TrainState.create(3, _settings(loss="minimax"))
    train_epoch(first, sources, targets, steps=2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = TrainState.from_state_dict(torch.load(buffer, weights_only=True))
    assert (resumed.epoch, resumed.step, resumed.settings) == (1, 2, first.settings)
    train_epoch(resumed, sources, targets, steps=2)
    assert _same(straight, resumed) and resumed.history == straight.history
    with pytest.raises(ValueError, match="training state"):
        TrainState.from_state_dict({"settings": {}})


def test_settings_are_validated() -> None:
    """Bad crop, batch, learning rate or loss name are refused."""
    for bad in ({"crop": 16}, {"batch": 0}, {"lr_g": 0.0}, {"loss": "wgan"}):
        with pytest.raises(ValueError):
            _settings(**bad)
