"""The CycleGAN baseline's networks: any size, tiled = untiled, the PatchGAN's output."""

import numpy as np
import pytest
import torch

from mr2nst.core.cyclegan import Generator, GeneratorConfig, PatchDiscriminator, run_generator
from mr2nst.core.errors import EngineConfigError


def randomized(config: GeneratorConfig, seed: int = 0) -> Generator:
    """A generator whose zero-initialised head is random too (outputs of order 1)."""
    torch.manual_seed(seed)
    generator = Generator(config)
    with torch.no_grad():
        generator.head.weight.normal_(0.0, 0.3)
    return generator.eval()


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (101, 30)])
def test_untrained_generator_is_the_identity_on_any_size(shape):
    """Odd and non-square sizes go through; the untrained generator changes nothing."""
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = run_generator(Generator(GeneratorConfig()).eval(), image)
    assert out.shape == shape
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("blocks", [0, 2])
def test_tiled_equals_untiled(blocks):
    """Tiles with the halo stitch to the untiled output (max difference <= 1e-4)."""
    generator = randomized(GeneratorConfig(width=8, depth=2, blocks=blocks, tile=64))
    image = np.random.default_rng(blocks).random((150, 231), dtype=np.float32)
    tiled = run_generator(generator, image, tile=64)
    whole = run_generator(generator, image, tile=256)
    assert np.abs(tiled - whole).max() <= 1e-4
    assert np.abs(whole - image).max() > 0.01


@pytest.mark.parametrize("blocks", [0, 2])
def test_halo_covers_the_receptive_field(blocks):
    """One changed pixel changes no output farther away than the halo."""
    cfg = GeneratorConfig(width=8, depth=2, blocks=blocks)
    generator = randomized(cfg, seed=1)
    x = torch.zeros(1, 1, 160, 160)
    with torch.no_grad():
        base = generator(x)
        x[0, 0, 81, 79] = 1.0
        changed = (generator(x) - base).abs()[0, 0] > 0
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert max((ys - 81).abs().max().item(), (xs - 79).abs().max().item()) <= cfg.halo


def test_patch_discriminator_gives_a_map_of_logits():
    """A 64×64 crop gives a map of patch logits (the 70×70 PatchGAN's 6×6 here)."""
    logits = PatchDiscriminator()(torch.rand(2, 1, 64, 64))
    assert logits.shape == (2, 1, 6, 6)


def test_config_bounds_name_the_key():
    """Bad settings are refused with the key's name."""
    with pytest.raises(EngineConfigError, match="cyclegan.blocks"):
        GeneratorConfig(blocks=10)
    with pytest.raises(EngineConfigError, match="cyclegan.tile"):
        GeneratorConfig(depth=3, tile=100)


def test_one_training_step_updates_all_four_networks():
    """A step changes both generators and both discriminators; every loss is finite, and
    the untrained (identity) generators start with zero cycle and identity loss."""
    from mr2nst.core.lab.cyclegan_train import CycleGan, CycleGanSettings

    model = CycleGan(GeneratorConfig(width=8, depth=1, blocks=1, tile=64), CycleGanSettings())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    ge = torch.rand(2, 1, 32, 32, generator=gen)
    losses = model.step(ge, 0.5 * torch.rand(2, 1, 32, 32, generator=gen) + 0.4)
    assert losses["cycle"] == 0.0 and losses["identity"] == 0.0
    assert all(np.isfinite(v) for v in losses.values())
    for net in ("g.head", "f.head", "d_uih.net.0", "d_ge.net.0"):
        key = f"{net}.weight"
        assert not torch.equal(before[key], model.state_dict()[key]), key


def test_fake_pool_returns_new_crops_until_full_then_mixes():
    """The image buffer hands back new crops while filling, then swaps about half."""
    from mr2nst.core.lab.cyclegan_train import FakePool

    pool = FakePool(4, seed=1)
    first = torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(pool.query(first), first)
    later = torch.full((200, 1, 1, 1), 9.0)
    out = pool.query(later)
    swapped = int((out != 9.0).sum())
    assert 1 <= swapped <= 4  # the 4 stored crops come back, each at most once (then replaced)
    assert int((out == 9.0).sum()) > 50
