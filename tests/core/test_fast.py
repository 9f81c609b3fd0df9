"""The fast student: shapes, tiling with a halo, its loss modules and its training loop."""

import numpy as np
import pytest
import torch

from mr2nst.core.errors import EngineConfigError
from mr2nst.core.fast import Student, StudentConfig, run_student
from mr2nst.core.lab.student_train import (
    L1Loss,
    Pair,
    SpectrumLoss,
    SsimLoss,
    StudentTrainSettings,
    train_student,
)


def randomized(config: StudentConfig, seed: int = 0) -> Student:
    """A student whose zero-initialised head is random too, so every path shows in the
    output (which stays of order 1, as a trained student's does)."""
    torch.manual_seed(seed)
    student = Student(config)
    with torch.no_grad():
        student.head.weight.normal_(0.0, 0.3)
    return student.eval()


def image(shape, seed=0):
    rng = np.random.default_rng(seed)
    content = rng.random(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    mask[:, : shape[1] * 2 // 3] = True
    return content, mask


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (101, 30), (1, 1)])
def test_untrained_student_returns_the_content_on_any_size(shape):
    """Odd, non-square and tiny sizes: the untrained student (zero head) is the identity."""
    content, mask = image(shape)
    out = run_student(Student(StudentConfig()).eval(), content, mask)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, content)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_tiled_equals_untiled(depth):
    """Tiles with the halo stitch to the untiled output (max difference <= 1e-4)."""
    cfg = StudentConfig(width=8, depth=depth, tile=64)
    student = randomized(cfg)
    content, mask = image((150, 231), seed=depth)
    tiled = run_student(student, content, mask, tile=64)
    whole = run_student(student, content, mask, tile=256)
    assert np.abs(tiled - whole).max() <= 1e-4
    assert np.abs(whole - content).max() > 0.01  # the random student does change the image


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_halo_covers_the_receptive_field(depth):
    """One changed input pixel changes no output pixel farther away than the halo."""
    cfg = StudentConfig(width=8, depth=depth)
    student = randomized(cfg, seed=1)
    x = torch.zeros(1, 4, 160, 160)
    with torch.no_grad():
        base = student(x)
        x[0, 0, 81, 79] = 1.0
        changed = (student(x) - base).abs()[0, 0] > 0
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert len(ys) > 0
    assert max((ys - 81).abs().max().item(), (xs - 79).abs().max().item()) <= cfg.halo


def test_config_bounds_name_the_key():
    """A bad architecture setting is refused with the key's name."""
    with pytest.raises(EngineConfigError, match="fast.depth"):
        StudentConfig(depth=5)
    with pytest.raises(EngineConfigError, match="fast.tile"):
        StudentConfig(depth=3, tile=100)


def test_loss_modules_are_zero_for_identical_images_and_see_grain():
    """L1, 1-SSIM and the spectrum distance vanish for equal crops; grain vs none is seen."""
    rng = torch.Generator().manual_seed(0)
    smooth = torch.linspace(0, 1, 64).repeat(64, 1)[None, None].repeat(2, 1, 1, 1)
    grainy = smooth + 0.05 * torch.randn(smooth.shape, generator=rng)
    for loss in (L1Loss(), SsimLoss(), SpectrumLoss(64)):
        assert float(loss(grainy, grainy)) == pytest.approx(0.0, abs=1e-6)
    assert float(SpectrumLoss(64)(smooth, grainy)) > 1.0
    assert float(SsimLoss()(smooth, grainy)) > 0.1


def pairs_for(student, n=2, shape=(80, 72)):
    """Images whose teacher is a fixed tone curve plus a brightness offset."""
    out = []
    for i in range(n):
        content, mask = image(shape, seed=10 + i)
        teacher = np.clip(0.6 * content + 0.3, 0, 1).astype(np.float32)
        out.append(Pair.of(content, mask, teacher, student))
    return out


SETTINGS = dict(crops_per_image=8, crop=32, batch=4, lr=1e-2, spectrum_weight=0.1)


def test_training_lowers_the_loss():
    """The student learns a simple teacher: the loss falls well below its start."""
    torch.manual_seed(0)
    student = Student(StudentConfig(width=8, depth=1))
    settings = StudentTrainSettings(epochs=20, **SETTINGS)
    state = train_student(student, pairs_for(student), settings)
    assert state.epoch == 20 and len(state.losses) == 20
    assert state.losses[-1]["l1"] < 0.3 * state.losses[0]["l1"]


class Interrupted(Exception):
    pass


def test_resume_continues_exactly():
    """A 4-epoch run interrupted after epoch 2 and resumed from its saved state ends with
    the weights of the same run done in one go."""
    cfg = StudentConfig(width=8, depth=1)
    settings = StudentTrainSettings(epochs=4, **SETTINGS)

    def fresh():
        torch.manual_seed(3)
        return Student(cfg)

    straight = fresh()
    train_student(straight, pairs_for(straight), settings)

    first = fresh()
    saved = {}

    def save_then_stop(report, state):
        saved["weights"] = {k: v.clone() for k, v in first.state_dict().items()}
        saved["state"] = state
        if report.epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_student(first, pairs_for(first), settings, on_epoch=save_then_stop)
    second = Student(cfg)
    second.load_state_dict(saved["weights"])
    resumed = train_student(second, pairs_for(second), settings, saved["state"])
    assert resumed.epoch == 4 and len(resumed.losses) == 4
    for a, b in zip(straight.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_detail_mode_composes_the_output_as_the_engine_does():
    """With the teacher's detail σ the output is L_σ(start) + S − L_σ(S) of the raw output S."""
    from mr2nst.core.merge import with_detail_of

    student = randomized(StudentConfig(width=8, depth=2))
    content, mask = image((90, 70), seed=5)
    raw = run_student(student, content, mask)
    composed = run_student(student, content, mask, detail_sigma=2.0)
    expected = with_detail_of(torch.from_numpy(raw), torch.from_numpy(content), 2.0).numpy()
    np.testing.assert_allclose(composed, expected, atol=1e-5)
    assert np.abs(composed - raw).max() > 1e-3


def test_peak_weight_marks_a_planted_bright_spot():
    """A 2-pixel bright spot on noise weighs 1 + extra; almost all of the rest weighs 1."""
    from mr2nst.core.lab.student_train import peak_weight

    gen = torch.Generator().manual_seed(0)
    start = 0.5 + 0.01 * torch.randn(1, 1, 48, 48, generator=gen)
    start[0, 0, 20, 20:22] += 0.3
    weight = peak_weight(start, 4.0)
    assert weight[0, 0, 20, 20] == 5.0 and weight[0, 0, 20, 21] == 5.0
    assert (weight == 1.0).float().mean() > 0.97
