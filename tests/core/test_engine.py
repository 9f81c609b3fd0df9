"""Tests of the public transfer engine on tiny images (mr2nst.core.engine)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mr2nst.core.engine import EngineConfig, EngineResult, Mr2nstEngine, Progress
from mr2nst.core.engine_config import PAPER_RECIPE
from mr2nst.core.errors import EngineConfigError, ImageError, RefinerError, WeightsError
from mr2nst.core.lab.phantom import PhantomSpec, make_case
from mr2nst.core.refiner import Refiner, save_refiner
from mr2nst.core.tiling import patch_shape, resize_patch, tiles_for

# METHOD.md's recipe (average of the scales, whole-tile resampling, no detail mode, linear
# tone): most tests here check that recipe's mechanics; the levers have their own tests.
TINY = EngineConfig(
    **{
        **PAPER_RECIPE,
        "patch_size": 32,
        "grids": (1, 2),
        "iterations": 4,
        "lr": 0.02,
        "features": "seeded-random",
        "report_every": 1,
    }
)


def _image(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random texture in [0, 1]."""
    gen = np.random.default_rng(seed)
    noise = gen.random((shape[0] // 4 + 1, shape[1] // 4 + 1))
    up = np.kron(noise, np.ones((4, 4)))[: shape[0], : shape[1]]
    return (0.2 + 0.6 * up).astype(np.float32)


@pytest.fixture(scope="module")
def engine() -> Mr2nstEngine:
    """One engine on the tiny config, shared by the module."""
    return Mr2nstEngine(TINY)


@pytest.fixture(scope="module")
def run(engine: Mr2nstEngine) -> tuple[EngineResult, list[Progress]]:
    """One transfer of an 80x64 texture with two references, and its progress reports."""
    content = _image((80, 64), 0)
    refs = [_image((90, 70), 1), _image((70, 60), 2)]
    seen: list[Progress] = []
    return engine.transfer(content, np.ones((80, 64), bool), refs, progress=seen.append), seen


def test_output_shape_range_and_counts(run: tuple[EngineResult, list[Progress]]) -> None:
    """A non-square input gives a same-shaped float32 image in [0, 1]; 1 + 4 tiles optimized."""
    result, _ = run
    assert result.image.shape == (80, 64) and result.image.dtype == np.float32
    assert result.image.min() >= 0.0 and result.image.max() <= 1.0
    assert [s.shape for s in result.scales] == [(80, 64), (80, 64)]
    assert (result.tiles_optimized, result.tiles_skipped) == (5, 0)
    assert [len(x) for x in result.final_losses] == [1, 4]


def test_loss_decreases_over_iterations(run: tuple[EngineResult, list[Progress]]) -> None:
    """Within each batch the reported loss falls from the first to the last iteration."""
    _, seen = run
    for scale in (0, 1):
        losses = [p.loss for p in seen if p.scale == scale]
        assert len(losses) == TINY.iterations  # every iteration + the end, last one shared
        assert losses[-1] < losses[0]


def test_progress_counts_tiles_over_the_whole_transfer(
    run: tuple[EngineResult, list[Progress]],
) -> None:
    """tiles_done grows to tiles_total; the last report is the final iteration."""
    _, seen = run
    assert seen[-1].tiles_done == seen[-1].tiles_total == 5
    assert seen[-1].iteration == seen[-1].iterations == TINY.iterations
    assert {(p.scale, p.grid) for p in seen} == {(0, 1), (1, 2)}


def test_seeded_runs_are_identical(
    engine: Mr2nstEngine, run: tuple[EngineResult, list[Progress]]
) -> None:
    """The same input through a fresh engine with the same config gives the same output."""
    again = Mr2nstEngine(TINY).transfer(
        _image((80, 64), 0), np.ones((80, 64), bool), [_image((90, 70), 1), _image((70, 60), 2)]
    )
    np.testing.assert_array_equal(again.image, run[0].image)
    assert again.final_losses == run[0].final_losses


def test_output_changes_the_content(run: tuple[EngineResult, list[Progress]]) -> None:
    """The optimization moves pixels away from the content."""
    assert np.abs(run[0].image - _image((80, 64), 0)).mean() > 1e-3


def test_background_tiles_are_skipped_and_take_the_background_value(engine: Mr2nstEngine) -> None:
    """With the breast on the left half only, the right tiles are skipped; background is set."""
    content = _image((64, 64), 3)
    mask = np.zeros((64, 64), bool)
    mask[:, :24] = True
    result = engine.transfer(content, mask, [_image((64, 64), 4)], background=0.125)
    assert (result.tiles_optimized, result.tiles_skipped) == (3, 2)
    assert np.all(result.image[~mask] == np.float32(0.125))
    assert [len(x) for x in result.final_losses] == [1, 2]


def test_no_iterations_at_native_patch_size_gives_back_the_content() -> None:
    """iterations=0, one tile and patch = image size: the pipeline is the identity on the mask."""
    engine = Mr2nstEngine(replace(TINY, grids=(1,), iterations=0))
    content = _image((32, 32), 5)
    mask = np.ones((32, 32), bool)
    result = engine.transfer(content, mask, [_image((40, 40), 6)])
    np.testing.assert_allclose(result.image, content, atol=1e-6)


def test_batch_size_does_not_change_the_result() -> None:
    """Tiles are independent: max_batch=1 gives the same image as batches of 4 (in the mean)."""
    # In float32 (bf16 rounding differs between batch sizes far more). Not bit-identical:
    # batched convolutions round differently, and Adam's normalised steps amplify that
    # noise where gradients are tiny, so the mean difference is checked.
    content = _image((80, 64), 0)
    refs = [_image((90, 70), 1), _image((70, 60), 2)]
    out = {}
    for batch in (1, 4):
        engine = Mr2nstEngine(replace(TINY, max_batch=batch, grids=(2,), amp=False))
        out[batch] = engine.transfer(content, np.ones((80, 64), bool), refs).scales[0]
    diff = np.abs(out[1] - out[4])
    assert diff.mean() < 1e-4 and diff.max() < 0.25 * TINY.lr


def test_phantom_crop_with_two_references() -> None:
    """A 128x112 phantom (GE rendering) styled with two UIH-like phantoms of other sizes."""
    case = make_case(PhantomSpec(height=128, width=112, seed=11, n_clusters=1))
    refs = [
        make_case(PhantomSpec(height=h, width=w, seed=s)).uih
        for h, w, s in ((136, 120, 12), (120, 104, 13))
    ]
    engine = Mr2nstEngine(replace(TINY, iterations=3))
    result = engine.transfer(case.ge, case.mask, refs, background=0.0)
    assert result.image.shape == case.ge.shape and np.isfinite(result.image).all()
    assert np.all(result.image[~case.mask] == 0.0)
    inside = result.image[case.mask]
    assert inside.min() >= 0.0 and inside.max() <= 1.0
    assert not np.allclose(inside, case.ge[case.mask], atol=1e-3)
    assert result.tiles_optimized + result.tiles_skipped == 5


def test_fingerprint_follows_what_shapes_the_output(engine: Mr2nstEngine) -> None:
    """Stable across instances; changes with alpha, seed and the refiner, not with max_batch."""
    fp = engine.fingerprint()
    assert fp == Mr2nstEngine(TINY).fingerprint()
    assert Mr2nstEngine(replace(TINY, max_batch=2, report_every=5)).fingerprint() == fp
    assert Mr2nstEngine(replace(TINY, alpha=1.0)).fingerprint() != fp
    assert Mr2nstEngine(replace(TINY, seed=1)).fingerprint() != fp
    trained = Refiner(2)
    trained.scale_weights.data.fill_(0.4)
    assert Mr2nstEngine(TINY, refiner=trained).fingerprint() != fp


def test_refiner_checkpoint_is_checked_against_the_engine(
    tmp_path: Path, engine: Mr2nstEngine
) -> None:
    """A checkpoint for this setup loads by path; one for another alpha is refused."""
    path = tmp_path / "refiner.pt"
    save_refiner(Refiner(2), path, engine.refiner_expectation())
    assert Mr2nstEngine(TINY, refiner=path).refiner_trained
    with pytest.raises(RefinerError, match="alpha"):
        Mr2nstEngine(replace(TINY, alpha=5.0), refiner=path)
    with pytest.raises(EngineConfigError, match="refiner"):
        Mr2nstEngine(TINY, refiner=Refiner(3))


def test_bad_inputs_are_refused(engine: Mr2nstEngine) -> None:
    """Out-of-range pixels, a wrong mask, no references and a stray init raise ImageError."""
    img, mask = _image((32, 32), 0), np.ones((32, 32), bool)
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        engine.transfer(img + 1.0, mask, [img])
    with pytest.raises(ImageError, match="content_mask"):
        engine.transfer(img, mask[:16], [img])
    with pytest.raises(ImageError, match="reference"):
        engine.transfer(img, mask, [])
    with pytest.raises(ImageError, match="init"):
        engine.transfer(img, mask, [img], init=img)
    ehm = Mr2nstEngine(replace(TINY, init="ehm", grids=(1,), iterations=1))
    with pytest.raises(ImageError, match="EHM"):
        ehm.transfer(img, mask, [img])
    assert ehm.transfer(img, mask, [img], init=img).image.shape == (32, 32)


def test_bad_config_names_the_setting() -> None:
    """Invalid settings raise EngineConfigError naming engine.<key>."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"patch_size": 40}, "patch_size"),
        ({"grids": ()}, "grids"),
        ({"overlap": 0.5}, "overlap"),
        ({"lr": 0.0}, "lr"),
        ({"device": "tpu"}, "device"),
        ({"features": "random"}, "features"),
        ({"content_layers": ("relu4_2", "relu4_2")}, "content_layers"),
        ({"content_layers": ()}, "content_layers"),
        ({"content_layers": ("conv1",)}, "content_layers"),
        ({"style_weights": (1.0,)}, "style_weights"),
        ({"style_weights": (0.0,) * 5}, "style_weights"),
        ({"pixel_weight": -1.0}, "pixel_weight"),
        ({"histogram_weight": -0.1}, "histogram_weight"),
        ({"detail_sigma": -1.0}, "detail_sigma"),
        ({"lr_schedule": "cosine"}, "lr_schedule"),
        ({"merge": "max"}, "merge"),
        ({"tone": "gamma"}, "tone"),
    ]
    for kw, key in cases:
        with pytest.raises(EngineConfigError, match=f"engine.{key}"):
            EngineConfig(**kw)
    assert EngineConfig(grids=[1, 2]).grids == (1, 2)  # a TOML list becomes a tuple


def test_imagenet_without_weights_never_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """features="imagenet" with no file anywhere stops with WeightsError."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="vgg19-dcbb9e9d.pth"):
        Mr2nstEngine(replace(TINY, features="imagenet"))


def test_warm_start_begins_each_scale_from_the_previous_stitched_scale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With warm_start, scale 1's tiles start from crops of the stitched scale-0 result."""
    import mr2nst.core.engine as engine_module

    starts: list[Any] = []
    real = engine_module.optimize

    def spy(*args: Any, **kwargs: Any) -> Any:
        starts.append(kwargs["init"])
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "optimize", spy)
    cfg = replace(TINY, grids=(1, 2), warm_start=True, max_batch=2)
    content = _image((64, 64), 0)
    result = Mr2nstEngine(cfg).transfer(content, np.ones((64, 64), bool), [_image((64, 64), 1)])
    assert starts[0] is None and len(starts) == 3  # scale 0, then 2 batches of 2 tiles
    tiles = tiles_for((64, 64), 2, cfg.overlap, scale=1)
    scale0 = torch.from_numpy(result.scales[0])
    for tile, start in zip(tiles, torch.cat(starts[1:]).split(1), strict=True):
        size = patch_shape(tile.shape, cfg.patch_size)
        expected = resize_patch(scale0[tile.slices][None, None], size)
        torch.testing.assert_close(start, expected)
    assert not np.allclose(result.scales[0], content, atol=1e-3)


@pytest.mark.slow
def test_lbfgs_lowers_the_loss_more_than_adam_in_as_many_iterations() -> None:
    """L-BFGS (strong-Wolfe line search, per tile) ends below the start's loss and Adam's."""
    content, refs = _image((64, 64), 7), [_image((64, 64), 8)]
    mask = np.ones((64, 64), bool)
    runs = {}
    for opt, iterations in (("adam", 0), ("adam", 12), ("lbfgs", 12)):
        cfg = replace(TINY, grids=(1,), iterations=iterations, optimizer=opt)
        runs[opt, iterations] = Mr2nstEngine(cfg).transfer(content, mask, refs).final_losses[0][0]
    assert runs["lbfgs", 12] < runs["adam", 12] < runs["adam", 0]


@pytest.mark.slow
def test_stop_at_ends_a_scale_once_its_summed_loss_is_reached() -> None:
    """Reachable thresholds stop a scale early; a tile without one makes its scale run in full."""
    content, refs = _image((64, 64), 0), [_image((64, 64), 1)]
    mask = np.ones((64, 64), bool)
    cfg = replace(TINY, grids=(2,), iterations=8, max_batch=2)
    full = Mr2nstEngine(cfg).transfer(content, mask, refs)
    assert full.iterations_run == ((8, 8, 8, 8),)
    goals = {
        (0, i, j): 1.5 * loss
        for (i, j), loss in zip(((0, 0), (0, 1), (1, 0), (1, 1)), full.final_losses[0], strict=True)
    }
    early = Mr2nstEngine(cfg).transfer(content, mask, refs, stop_at=goals)
    assert max(early.iterations_run[0]) < 8
    assert sum(early.final_losses[0]) <= sum(goals.values())
    partial = Mr2nstEngine(cfg).transfer(content, mask, refs, stop_at={(0, 0, 0): 1.0})
    assert partial.iterations_run == ((8, 8, 8, 8),)


def test_batches_follow_the_memory_budget() -> None:
    """The budget caps tiles per batch; a scale's tiles are split into even batches."""
    from mr2nst.core.engine import batch_limit
    from mr2nst.core.optimize import cpu_has_bf16

    cpu = torch.device("cpu")
    cfg = replace(TINY, patch_size=512, max_batch=16, amp=False)
    per_tile_mb = 512 * 512 * 2400 / 2**20
    assert batch_limit((512, 512), replace(cfg, memory_budget_mb=4096), cpu) == int(
        4096 // per_tile_mb
    )
    assert batch_limit((512, 512), replace(cfg, memory_budget_mb=1), cpu) == 1
    assert batch_limit((32, 32), replace(cfg, memory_budget_mb=4096), cpu) == 16
    bf16 = batch_limit((512, 512), replace(cfg, amp=True), cpu)  # bf16 halves the estimate
    assert bf16 == int(4096 // (512 * 512 * (1300 if cpu_has_bf16() else 2400) / 2**20))
    engine = Mr2nstEngine(replace(TINY, max_batch=3))
    seen: list[Progress] = []
    engine.transfer(
        _image((64, 64), 0), np.ones((64, 64), bool), [_image((64, 64), 1)], progress=seen.append
    )
    assert {p.n_batches for p in seen if p.scale == 1} == {2}


def test_step_schedule_lowers_adams_step() -> None:
    """lr_schedule = "step": the full lr, then x0.3 from 50 % and x0.09 from 75 %."""
    from mr2nst.core.optimize import OptimizeSettings

    settings = OptimizeSettings.from_config(replace(TINY, iterations=8, lr=0.1, lr_schedule="step"))
    assert [round(settings.lr_at(i), 6) for i in (0, 3, 4, 5, 6, 7)] == [
        0.1,
        0.1,
        0.03,
        0.03,
        0.009,
        0.009,
    ]
    assert OptimizeSettings.from_config(replace(TINY, lr=0.1)).lr_at(7) == 0.1


def test_levers_together_lower_the_loss_and_keep_the_detail_modes_low_band() -> None:
    """All levers together lower the loss; the output's low band is the start's (detail mode)."""
    # Shallow content layers, pixel and histogram terms, bands and detail mode, on a tiny image.
    from mr2nst.core.merge import gaussian_blur

    content, refs = _image((64, 48), 3), [_image((64, 64), 4), _image((50, 60), 5)]
    mask = np.ones(content.shape, bool)
    cfg = replace(
        TINY,
        content_layers=("relu1_1", "relu4_2"),
        pixel_weight=10.0,
        histogram_weight=1e-3,
        merge="bands",
        detail_sigma=2.0,
        style_weights=(2.0, 1.0, 1.0, 0.5, 0.5),
        lr=0.002,
    )
    before = Mr2nstEngine(replace(cfg, iterations=0)).transfer(content, mask, refs)
    after = Mr2nstEngine(replace(cfg, iterations=6)).transfer(content, mask, refs)
    assert sum(map(sum, after.final_losses)) < sum(map(sum, before.final_losses))
    assert len(after.merge_inputs) == 2 and not np.allclose(after.merge_inputs[0], after.scales[0])
    low = gaussian_blur(torch.from_numpy(after.image), 2.0).numpy()
    start_low = gaussian_blur(torch.from_numpy(content), 2.0).numpy()
    assert np.abs(low - start_low).max() < 0.03  # clipping to [0, 1] only


def test_residual_resampling_keeps_the_native_detail() -> None:
    """resample="residual" keeps each scale the start to the pixel; "image" loses fine detail."""
    # With no iterations, every residual scale is the start itself.
    gen = np.random.default_rng(9)
    content = (0.3 + 0.4 * gen.random((70, 58))).astype(np.float32)  # pixel-level noise
    mask, refs = np.ones(content.shape, bool), [_image((64, 64), 10)]
    cfg = replace(TINY, grids=(1, 2), iterations=0)
    residual = Mr2nstEngine(replace(cfg, resample="residual")).transfer(content, mask, refs)
    for scale in residual.scales:
        np.testing.assert_allclose(scale, content, atol=1e-6)
    image = Mr2nstEngine(cfg).transfer(content, mask, refs)
    assert np.var(image.scales[0] - content) > 1e-3
    with pytest.raises(EngineConfigError, match="engine.resample"):
        replace(cfg, resample="nearest")
