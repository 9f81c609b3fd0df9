"""Tests of the plain reference loop (mr2nst.core.lab.baseline) on tiny images."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mr2nst.core.engine import EngineConfig, Mr2nstEngine
from mr2nst.core.engine_config import PAPER_RECIPE
from mr2nst.core.features import build_features
from mr2nst.core.lab.baseline import PlainResult, plain_transfer

# The plain loop is a research path (``mr2nst bench`` compares the engine with it).
pytestmark = pytest.mark.slow

TINY = EngineConfig(
    **{**PAPER_RECIPE, "lr": 0.02},
    patch_size=32,
    grids=(1, 2),
    iterations=3,
    features="seeded-random",
)


def _image(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random texture in [0, 1]."""
    gen = np.random.default_rng(seed)
    noise = gen.random((shape[0] // 4 + 1, shape[1] // 4 + 1))
    return (0.2 + 0.6 * np.kron(noise, np.ones((4, 4)))[: shape[0], : shape[1]]).astype(np.float32)


@pytest.fixture(scope="module")
def half_mask() -> np.ndarray:
    """A breast on the left 24 of 64 columns: two of the four scale-1 tiles are background."""
    mask = np.zeros((64, 64), bool)
    mask[:, :24] = True
    return mask


@pytest.fixture(scope="module")
def plain(half_mask: np.ndarray) -> PlainResult:
    """The plain loop on a 64x64 texture with one reference, tracing every iteration."""
    features = build_features("seeded-random")
    content = torch.from_numpy(_image((64, 64), 3))
    refs = [torch.from_numpy(_image((72, 60), 4))]
    return plain_transfer(features, content, half_mask, refs, TINY, trace_every=1)


def test_every_tile_is_optimized_including_background(plain: PlainResult) -> None:
    """All 1 + 4 tiles get a final loss; the two right tiles are flagged as background."""
    assert [len(x) for x in plain.final_losses] == [1, 4]
    assert plain.background == ((False,), (False, True, False, True))
    assert all(np.isfinite(v) for scale in plain.final_losses for v in scale)
    assert [s.shape for s in plain.scales] == [(64, 64), (64, 64)]


def test_trace_records_every_tile_and_ends_with_its_final_loss(plain: PlainResult) -> None:
    """trace_every=1 gives iterations 0..n per tile; the last point is the final loss."""
    tile0 = [p for p in plain.trace if (p.scale, p.tile) == (1, 2)]
    assert [p.iteration for p in tile0] == [0, 1, 2, 3]
    assert tile0[-1].loss == plain.final_losses[1][2]
    assert tile0[-1].loss < tile0[0].loss


def test_loss_matches_the_engines_on_the_same_tiles(
    plain: PlainResult, half_mask: np.ndarray
) -> None:
    """Same loss definition: with 1 iteration of fp32 Adam both give the same final losses."""
    features = build_features("seeded-random")
    one = replace(TINY, iterations=1, max_batch=1, amp=False)
    content, ref = _image((64, 64), 3), _image((72, 60), 4)
    base = plain_transfer(
        features, torch.from_numpy(content), half_mask, [torch.from_numpy(ref)], one
    )
    engine = Mr2nstEngine(one).transfer(content, half_mask, [ref])
    active = [
        [v for v, bg in zip(losses, flags, strict=True) if not bg]
        for losses, flags in zip(base.final_losses, base.background, strict=True)
    ]
    np.testing.assert_allclose(
        np.concatenate(active), np.concatenate(engine.final_losses), rtol=1e-4
    )
