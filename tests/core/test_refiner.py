"""Tests of the scale-merging refiner and its checkpoints (mr2nst.core.refiner)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mr2nst.core.errors import RefinerError
from mr2nst.core.refiner import Refiner, load_refiner, save_refiner

EXPECTED: dict[str, Any] = {
    "engine_config": {"patch_size": 512, "grids": [1, 2, 4], "alpha": 1000.0},
    "weights_id": "imagenet:dcbb9e9d",
}


def _trained(n: int = 3) -> Refiner:
    """A refiner with non-default parameters, as after training."""
    refiner = Refiner(n)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in refiner.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return refiner


@pytest.mark.parametrize("n", [1, 2, 3])
def test_untrained_refiner_is_the_plain_average(n: int) -> None:
    """w = 1/n and a zero last conv: the output is the mean of the scales."""
    scales = torch.rand(2, n, 17, 13)
    with torch.no_grad():
        out = Refiner(n)(scales)
    assert out.shape == (2, 1, 17, 13)
    assert torch.allclose(out, scales.mean(dim=1, keepdim=True), atol=1e-6, rtol=0)


def test_residual_branch_contributes_once_trained() -> None:
    """With a non-zero last conv the output is no longer the plain average."""
    scales = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        out = _trained()(scales)
    assert not torch.allclose(out, scales.mean(dim=1, keepdim=True), atol=1e-4)


def test_untrained_refiners_are_identical() -> None:
    """The fixed init seed gives every untrained refiner the same parameters and id."""
    assert Refiner(3).id() == Refiner(3).id()
    assert Refiner(3).id() != Refiner(2).id()
    assert Refiner(3).id() != _trained().id()


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    """save_refiner then load_refiner gives the same parameters and output."""
    refiner = _trained()
    path = tmp_path / "refiner.pt"
    save_refiner(refiner, path, EXPECTED)
    loaded = load_refiner(path, EXPECTED)
    assert loaded.id() == refiner.id()
    scales = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(scales), refiner(scales))


def test_weights_id_mismatch_is_refused(tmp_path: Path) -> None:
    """A refiner trained on other VGG weights is refused, naming weights_id."""
    path = tmp_path / "refiner.pt"
    save_refiner(_trained(), path, EXPECTED)
    other = {**EXPECTED, "weights_id": "seeded-random:seed=0"}
    with pytest.raises(RefinerError, match="weights_id"):
        load_refiner(path, other)


def test_engine_config_mismatch_is_refused(tmp_path: Path) -> None:
    """A refiner trained for other grids is refused, naming the setting."""
    path = tmp_path / "refiner.pt"
    save_refiner(_trained(), path, EXPECTED)
    other = {**EXPECTED, "engine_config": {**EXPECTED["engine_config"], "grids": [1, 2]}}
    with pytest.raises(RefinerError, match=r"engine_config\.grids"):
        load_refiner(path, other)


def test_missing_or_foreign_files_are_refused(tmp_path: Path) -> None:
    """No file, an unreadable file or a plain state dict raise RefinerError."""
    with pytest.raises(RefinerError, match="not found"):
        load_refiner(tmp_path / "none.pt", EXPECTED)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(RefinerError, match="cannot read"):
        load_refiner(junk, EXPECTED)
    plain = tmp_path / "plain.pt"
    torch.save(Refiner(3).state_dict(), plain)
    with pytest.raises(RefinerError, match="not a refiner checkpoint"):
        load_refiner(plain, EXPECTED)


def test_wrong_number_of_scales_is_an_error() -> None:
    """The scale stack must have n_scales channels."""
    with pytest.raises(ValueError):
        Refiner(3)(torch.rand(1, 2, 4, 4))
