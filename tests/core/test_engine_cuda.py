"""CUDA smoke tests of the engine (skipped without a GPU; run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from mr2nst.core.engine import EngineConfig, Mr2nstEngine, resolved_device
from mr2nst.core.engine_config import PAPER_RECIPE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = EngineConfig(
    **{**PAPER_RECIPE, "lr": 0.02},
    patch_size=64,
    grids=(1, 2),
    iterations=6,
    features="seeded-random",
    device="cuda",
)


def _image(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random texture in [0, 1]."""
    gen = np.random.default_rng(seed)
    noise = gen.random((shape[0] // 4 + 1, shape[1] // 4 + 1))
    return (0.2 + 0.6 * np.kron(noise, np.ones((4, 4)))[: shape[0], : shape[1]]).astype(np.float32)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_cuda_autocast_transfer_is_finite_and_close_to_cpu(optimizer: str) -> None:
    """auto picks CUDA; the autocast run is finite, in range and near the fp32 CPU result."""
    assert resolved_device(replace(TINY, device="auto")).type == "cuda"
    content, refs = _image((128, 112), 0), [_image((120, 100), 1), _image((130, 120), 2)]
    mask = np.ones(content.shape, bool)
    cfg = replace(TINY, optimizer=optimizer, warm_start=optimizer == "lbfgs")
    gpu = Mr2nstEngine(cfg).transfer(content, mask, refs)
    cpu = Mr2nstEngine(replace(cfg, device="cpu")).transfer(content, mask, refs)
    assert np.isfinite(gpu.image).all() and 0.0 <= gpu.image.min() <= gpu.image.max() <= 1.0
    assert np.abs(gpu.image - cpu.image).mean() < 0.02
    assert torch.cuda.max_memory_allocated() > 0
