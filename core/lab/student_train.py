"""Training the fast student (:mod:`mr2nst.core.fast`) on the engine's own outputs.

The data are pairs, one per source image: the student's input channels for the whole
image (content, mask, coarse context; the noise is drawn fresh for every crop) and the
engine's output for it (the teacher). Each step takes a batch of random crops at native
resolution, centred in the breast most of the time, and minimises a sum of tiny loss
modules that keeps both the pixels and the texture:

- :class:`L1Loss`: the pixels, weighted up (``detail_weight``) where the start image has a
  bright local peak (a µC or a fine bright edge: what a CAD must not lose);
- :class:`SsimLoss`: 1 − SSIM (Gaussian window), local structure and contrast;
- :class:`SpectrumLoss`: the distance between the radially averaged log power spectra of
  student and teacher crops, which is what makes the student draw grain of the teacher's
  strength and scale from its noise channel instead of averaging it away.

With the teacher's detail mode (``detail_sigma``) the student's output is composed as the
engine's is (:func:`mr2nst.core.fast.compose`) before the loss. Progress goes through a
callback, once per epoch; the caller saves checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from ..fast import Student, compose, student_inputs


@dataclass(frozen=True)
class StudentTrainSettings:
    """How the student is trained.

    Attributes:
        epochs: passes; each draws ``crops_per_image`` crops of every image.
        crops_per_image: crops per image and epoch.
        crop: crop size in pixels (native resolution).
        batch: crops per step.
        lr: Adam's learning rate (cosine decay to 10 % over all epochs).
        l1_weight, ssim_weight, spectrum_weight: the loss terms' weights.
        detail_weight: extra L1 weight on the start image's bright local peaks (pixels
            whose σ-1 high-pass exceeds 3 robust standard deviations of the crop's).
        detail_sigma: the teacher engine's detail mode σ (0: off).
        breast_fraction: share of crops centred on a breast pixel (the rest anywhere).
        seed: crops, noise and initialisation.
    """

    epochs: int = 30
    crops_per_image: int = 16
    crop: int = 96
    batch: int = 8
    lr: float = 2e-3
    l1_weight: float = 1.0
    ssim_weight: float = 1.0
    spectrum_weight: float = 0.5
    detail_weight: float = 16.0  # the tuning set (s8): µC CNR 0.792 vs 0.785 at 4
    detail_sigma: float = 0.0
    breast_fraction: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "crops_per_image", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.crop < 32:
            raise ValueError(f"crop: must be >= 32, got {self.crop}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return asdict(self)


@dataclass(frozen=True)
class Pair:
    """One training image: the student's input channels without noise ``(3, Hp, Wp)``, the
    teacher's output ``(Hp, Wp)``, and the breast pixels' coordinates (crop centres)."""

    inputs: Tensor
    target: Tensor
    breast: npt.NDArray[np.int64]

    @classmethod
    def of(cls, content: Any, mask: Any, teacher: Any, student: Student) -> Pair:
        """The pair for one image (arrays ``(H, W)``: start image, mask, teacher output)."""
        full = student_inputs(content, mask, student.config, noise=_no_noise(content, student))
        target = torch.zeros(full.shape[-2:])
        h, w = teacher.shape
        target[:h, :w] = torch.from_numpy(np.ascontiguousarray(teacher, dtype=np.float32))
        return cls(full[:3].contiguous(), target, np.argwhere(np.asarray(mask)))


def _no_noise(content: Any, student: Student) -> npt.NDArray[np.float32]:
    from ..halo import padded_shape

    return np.zeros(padded_shape(content.shape, student.config.stride), np.float32)


@dataclass
class TrainingState:
    """Where training stands (saved with each checkpoint, so that it can resume)."""

    epoch: int = 0
    losses: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    optimizer: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    torch_rng: Tensor | None = None


@dataclass(frozen=True)
class EpochReport:
    """One finished epoch, for the progress callback."""

    epoch: int
    epochs: int
    losses: dict[str, float]
    seconds: float


class L1Loss(nn.Module):
    """Mean absolute difference, optionally weighted per pixel."""

    def forward(self, output: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        diff = (output - target).abs()
        if weight is None:
            return diff.mean()
        return (diff * weight).sum() / weight.sum()


def peak_weight(start: Tensor, extra: float) -> Tensor:
    """``1 + extra`` on the bright local peaks of ``start`` ``(N, 1, S, S)``, else 1.

    A peak is a pixel whose σ-1 high-pass exceeds 3 robust standard deviations (1.4826 ×
    the median absolute value) of its crop's high-pass: µCs and fine bright edges.
    """
    from ..merge import gaussian_blur

    high = start - gaussian_blur(start, 1.0)
    scale = 1.4826 * high.abs().flatten(1).median(dim=1).values.clamp(min=1e-6)
    peaks = high > 3.0 * scale[:, None, None, None]
    return 1.0 + extra * peaks.float()


class SsimLoss(nn.Module):
    """1 − SSIM with an 11-pixel Gaussian window (σ 1.5), for images in [0, 1]."""

    def __init__(self, sigma: float = 1.5, size: int = 11) -> None:
        super().__init__()
        x = torch.arange(size, dtype=torch.float32) - size // 2
        g = torch.exp(-(x**2) / (2 * sigma**2))
        g = g / g.sum()
        self.register_buffer("window", (g[:, None] * g[None, :])[None, None])

    def _blur(self, x: Tensor) -> Tensor:
        window: Tensor = self.window  # type: ignore[assignment]
        return F.conv2d(x, window)

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        c1, c2 = 0.01**2, 0.03**2
        mu_x, mu_y = self._blur(output), self._blur(target)
        var_x = self._blur(output * output) - mu_x**2
        var_y = self._blur(target * target) - mu_y**2
        cov = self._blur(output * target) - mu_x * mu_y
        ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
            (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
        )
        return 1.0 - ssim.mean()


class SpectrumLoss(nn.Module):
    """Mean |log P_out(r) − log P_target(r)| over radial frequency bins, per crop.

    Each crop's mean is removed and a Hann window applied before the FFT; ``P(r)`` is
    the power averaged over the ring at radius ``r`` (bins of one frequency step).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        hann = torch.hann_window(size, periodic=False)
        self.register_buffer("hann", hann[:, None] * hann[None, :])
        f = torch.fft.fftfreq(size)
        radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2) * size
        bins = radius.round().long().clamp(max=size // 2)
        self.register_buffer("bins", bins.flatten())
        self.register_buffer("counts", torch.bincount(bins.flatten(), minlength=size // 2 + 1))
        self.n_bins = size // 2 + 1

    def profile(self, x: Tensor) -> Tensor:
        """Log radial power profiles ``(N, bins)`` of crops ``(N, 1, S, S)``."""
        hann: Tensor = self.hann  # type: ignore[assignment]
        bins: Tensor = self.bins  # type: ignore[assignment]
        counts: Tensor = self.counts  # type: ignore[assignment]
        x = (x[:, 0] - x[:, 0].mean(dim=(-2, -1), keepdim=True)) * hann
        power = torch.fft.fft2(x).abs().pow(2).flatten(1)
        sums = torch.zeros(x.shape[0], self.n_bins, device=x.device)
        sums.index_add_(1, bins, power)
        return torch.log(sums / counts.clamp(min=1) + 1e-8)[:, 1:]  # without the mean (DC)

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return (self.profile(output) - self.profile(target)).abs().mean()


class StudentLoss(nn.Module):
    """The weighted sum of the three terms; :meth:`parts` also returns each term."""

    def __init__(self, settings: StudentTrainSettings) -> None:
        super().__init__()
        self.terms = nn.ModuleDict(
            {"l1": L1Loss(), "ssim": SsimLoss(), "spectrum": SpectrumLoss(settings.crop)}
        )
        self.weights = {
            "l1": settings.l1_weight,
            "ssim": settings.ssim_weight,
            "spectrum": settings.spectrum_weight,
        }

    def parts(
        self, output: Tensor, target: Tensor, weight: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """The total loss and each (unweighted) term's value; ``weight`` weighs L1."""
        total = output.new_zeros(())
        values = {}
        for name, term in self.terms.items():
            value = term(output, target, weight) if name == "l1" else term(output, target)
            values[name] = float(value.detach())
            total = total + self.weights[name] * value
        values["total"] = float(total.detach())
        return total, values


def sample_batch(
    pairs: Sequence[Pair], settings: StudentTrainSettings, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Random crops: inputs ``(B, 4, S, S)`` with fresh noise, targets ``(B, 1, S, S)``."""
    size = settings.crop
    xs, ys = [], []
    for _ in range(settings.batch):
        pair = pairs[int(rng.integers(len(pairs)))]
        hp, wp = pair.target.shape
        if len(pair.breast) and rng.random() < settings.breast_fraction:
            cy, cx = pair.breast[int(rng.integers(len(pair.breast)))]
            y0 = int(np.clip(cy - size // 2, 0, max(0, hp - size)))
            x0 = int(np.clip(cx - size // 2, 0, max(0, wp - size)))
        else:
            y0 = int(rng.integers(max(1, hp - size + 1)))
            x0 = int(rng.integers(max(1, wp - size + 1)))
        x = _fit(pair.inputs[:, y0 : y0 + size, x0 : x0 + size], size)
        noise = torch.from_numpy(rng.standard_normal((1, size, size), np.float32))
        xs.append(torch.cat([x, noise]))
        ys.append(_fit(pair.target[None, y0 : y0 + size, x0 : x0 + size], size))
    return torch.stack(xs), torch.stack(ys)


def _fit(x: Tensor, size: int) -> Tensor:
    """``x`` zero-padded to ``size``×``size`` (images smaller than a crop)."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, size - w, 0, size - h)) if (h, w) != (size, size) else x


def train_student(
    student: Student,
    pairs: Sequence[Pair],
    settings: StudentTrainSettings,
    state: TrainingState | None = None,
    on_epoch: Callable[[EpochReport, TrainingState], None] | None = None,
) -> TrainingState:
    """Train ``student`` on ``pairs`` until ``settings.epochs`` (resuming from ``state``).

    Args:
        student: the network (its weights are updated in place).
        pairs: the training images.
        settings: the training settings (the same as before when resuming).
        state: a saved state to resume from; None starts at epoch 0.
        on_epoch: called after every epoch with its report and the state to save.

    Returns:
        The final state.
    """
    if not pairs:
        raise ValueError("no training images")
    state = state or TrainingState()
    rng = np.random.default_rng(settings.seed)
    if state.rng is not None:
        rng.bit_generator.state = state.rng
    if state.torch_rng is not None:
        torch.set_rng_state(state.torch_rng)
    loss = StudentLoss(settings)
    optimizer = torch.optim.Adam(student.parameters(), lr=settings.lr)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    steps = max(1, math.ceil(len(pairs) * settings.crops_per_image / settings.batch))
    student.train()
    for epoch in range(state.epoch, settings.epochs):
        started = time.perf_counter()
        for group in optimizer.param_groups:  # cosine decay to 10 % of lr
            group["lr"] = settings.lr * (0.55 + 0.45 * math.cos(math.pi * epoch / settings.epochs))
        sums: dict[str, float] = {}
        for _ in range(steps):
            x, y = sample_batch(pairs, settings, rng)
            start = x[:, :1]
            output = compose(student(x), start, settings.detail_sigma)
            weight = peak_weight(start, settings.detail_weight) if settings.detail_weight else None
            total, values = loss.parts(output, y, weight)
            optimizer.zero_grad(set_to_none=True)
            total.backward()  # type: ignore[no-untyped-call, unused-ignore]
            optimizer.step()
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value / steps
        seconds = time.perf_counter() - started
        state.epoch = epoch + 1
        state.losses.append({k: round(v, 6) for k, v in sums.items()})
        state.seconds += seconds
        state.optimizer = dict(optimizer.state_dict())
        state.rng = dict(rng.bit_generator.state)
        state.torch_rng = torch.get_rng_state()
        if on_epoch is not None:
            on_epoch(EpochReport(state.epoch, settings.epochs, sums, seconds), state)
    student.eval()
    return state
