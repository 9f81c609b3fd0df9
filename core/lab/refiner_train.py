"""Adversarial training of the refiner (METHOD.md "Refiner training"); pure tensors.

The refiner R (scale weights ``w`` plus the three 1×1 convolutions ``r``, see
:mod:`.refiner`) is the generator. A :class:`Discriminator` D (torchvision ResNet18 with
a 1-channel first convolution and a single logit) judges whether a crop has the target
(UIH) style. The paper's objective is

    L = log D(real) + log(1 − D(R(S0, S1, S2)))

which D maximises and R minimises. It is implemented with BCE-with-logits:

- D step: ``BCE(D(real), 1) + BCE(D(fake.detach()), 0)`` (= −L, minimised).
- R step, ``loss = "non-saturating"`` (default): ``BCE(D(fake), 1)`` = −log D(R(S)), the
  usual substitute for minimising log(1 − D(R(S))), which has vanishing gradients while
  D easily rejects the fakes. ``loss = "minimax"`` uses the literal term
  ``log(1 − D(R(S)))`` = −BCE(D(fake), 0). Either way the reported generator loss
  ``loss_g`` is the non-saturating value −log D(R(S)), so runs are comparable.

Training uses random native-resolution crops (Normative): one window per source image
cut at the same place from all of its scales, and windows of target images, each centred
on a breast pixel. As in the engine, R's output is clipped to [0, 1] and its background
pixels (mask False) set to 0; target crops get the same background.

Everything random (weight init of D, crop positions) comes from the seed, so a run on the
CPU is reproducible (on CUDA, up to the GPU kernels' own nondeterminism), and
:meth:`TrainState.state_dict` captures all of it (networks,
optimizers, counters, the crop generator) for an exact resume. Reading and writing files
is the caller's job.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet18  # type: ignore[import-untyped, unused-ignore]

from mr2nst.core.refiner import Refiner

GeneratorLoss = Literal["non-saturating", "minimax"]

#: Grey-level normalisation for D's input: the mean of ImageNet's RGB means and stds, which
#: fits the summed RGB weights of a pretrained first convolution.
D_MEAN, D_STD = 0.449, 0.226


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one training run (recorded in checkpoints)."""

    crop: int = 256
    batch: int = 8
    lr_g: float = 1e-3
    lr_d: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    seed: int = 0
    loss: GeneratorLoss = "non-saturating"

    def __post_init__(self) -> None:
        if self.crop < 32:
            raise ValueError(f"crop must be at least 32 pixels, got {self.crop}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not (self.lr_g > 0 and self.lr_d > 0):
            raise ValueError(f"learning rates must be > 0, got {self.lr_g}, {self.lr_d}")
        if self.loss not in get_args(GeneratorLoss):
            raise ValueError(f"loss must be one of {get_args(GeneratorLoss)}, got {self.loss!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Discriminator(nn.Module):
    """ResNet18 on one grey channel, one logit ("has the target style").

    ``imagenet`` is an optional torchvision ``resnet18`` state dict; its RGB ``conv1``
    weights are summed into the single input channel and its ``fc`` is dropped. Without it
    the network starts from the (seeded) torchvision initialisation.
    """

    def __init__(self, imagenet: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        net = resnet18(weights=None)
        if imagenet is not None:
            state = {k: v for k, v in imagenet.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
                raise ValueError("not a torchvision resnet18 state dict")
        conv = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        with torch.no_grad():
            if imagenet is not None:
                conv.weight.copy_(net.conv1.weight.sum(dim=1, keepdim=True))
            else:
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        net.conv1 = conv
        net.fc = nn.Linear(net.fc.in_features, 1)
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        """``(N, 1, h, w)`` in [0, 1] -> ``(N,)`` logits."""
        out: Tensor = self.net((images - D_MEAN) / D_STD)
        return out[:, 0]


@dataclass(frozen=True)
class TrainImage:
    """One training image: ``pixels`` (C, H, W) float (the scales S0.. of a source, or the
    single channel of a target; memory-mapped arrays are fine), its breast ``mask`` (H, W)
    and ``centres`` (N, 2), the breast pixels a crop may be centred on."""

    pixels: npt.NDArray[np.float32]
    mask: npt.NDArray[np.bool_]
    centres: npt.NDArray[np.int32]

    @classmethod
    def from_arrays(
        cls, pixels: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_], stride: int = 4
    ) -> TrainImage:
        """Candidate centres on a ``stride`` grid inside the mask (all pixels if it is empty)."""
        if pixels.ndim != 3 or pixels.shape[1:] != mask.shape:
            raise ValueError(f"pixels {pixels.shape} and mask {mask.shape} do not match")
        grid = np.asarray(mask[::stride, ::stride])
        if not grid.any():
            grid = np.ones_like(grid)
        rows, cols = np.nonzero(grid)
        centres = np.stack([rows * stride, cols * stride], axis=1).astype(np.int32)
        return cls(pixels, mask, centres)


def crop(image: TrainImage, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random ``size``² window centred on a breast pixel (shifted to fit the image):
    ``((C, size, size) float, (1, size, size) bool)``, the same window for every channel."""
    height, width = image.mask.shape
    if size > min(height, width):
        raise ValueError(f"crop {size} is larger than the image ({height}x{width})")
    pick = int(torch.randint(len(image.centres), (1,), generator=gen))
    row, col = (int(v) for v in image.centres[pick])
    top = min(max(row - size // 2, 0), height - size)
    left = min(max(col - size // 2, 0), width - size)
    window = np.s_[top : top + size, left : left + size]
    pixels = np.array(image.pixels[(slice(None), *window)], dtype=np.float32)
    mask = np.array(image.mask[window], dtype=np.bool_)[None]
    return torch.from_numpy(pixels), torch.from_numpy(mask)


def batch_of(
    images: Sequence[TrainImage], count: int, size: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``count`` crops of randomly chosen ``images``: ``(count, C, s, s)``, ``(count, 1, s, s)``."""
    picks = torch.randint(len(images), (count,), generator=gen).tolist()
    pairs = [crop(images[i], size, gen) for i in picks]
    return torch.stack([p for p, _ in pairs]), torch.stack([m for _, m in pairs])


def generate(refiner: Refiner, scales: Tensor, mask: Tensor) -> Tensor:
    """The refiner's output as the engine delivers it: clipped, background 0."""
    return torch.where(mask, refiner(scales).clamp(0.0, 1.0), 0.0)


@dataclass(frozen=True)
class StepLosses:
    """One step's losses; ``d_real``/``d_fake`` are D's mean probabilities."""

    loss_d: float
    loss_g: float
    d_real: float
    d_fake: float


@dataclass(frozen=True)
class TrainProgress:
    """Reported after every step."""

    epoch: int  # 0-based epoch being trained
    step: int  # steps done in this epoch
    steps: int  # steps per epoch
    losses: StepLosses


@dataclass
class TrainState:
    """Everything a resumed run needs: networks, optimizers, counters, crop RNG."""

    settings: TrainSettings
    refiner: Refiner
    discriminator: Discriminator
    opt_g: torch.optim.Adam
    opt_d: torch.optim.Adam
    gen: torch.Generator  # crop positions; always on the CPU
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    epoch: int = 0  # completed epochs
    step: int = 0  # completed steps, all epochs
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch mean losses

    @classmethod
    def create(
        cls,
        n_scales: int,
        settings: TrainSettings,
        imagenet: Mapping[str, Tensor] | None = None,
        device: str | torch.device = "cpu",
    ) -> TrainState:
        """A fresh run: untrained refiner (plain average), D initialised from the seed.

        Args:
            n_scales: the scales the refiner merges (``len(engine.grids)``).
            settings: the training settings (their seed seeds D and the crops).
            imagenet: a torchvision ``resnet18`` state dict to start D from (see
                :class:`Discriminator`); None: the seeded random initialisation.
            device: where the networks live (the crop generator stays on the CPU).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            discriminator = Discriminator(imagenet)
        device = torch.device(device)
        discriminator = discriminator.to(device)
        refiner = Refiner(n_scales).to(device)
        betas = (settings.beta1, settings.beta2)
        return cls(
            settings=settings,
            refiner=refiner,
            discriminator=discriminator,
            opt_g=torch.optim.Adam(refiner.parameters(), lr=settings.lr_g, betas=betas),
            opt_d=torch.optim.Adam(discriminator.parameters(), lr=settings.lr_d, betas=betas),
            gen=torch.Generator().manual_seed(settings.seed),
            device=device,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers only (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "settings": self.settings.to_dict(),
            "n_scales": self.refiner.n_scales,
            "refiner": {k: v.detach().cpu().clone() for k, v in self.refiner.state_dict().items()},
            "discriminator": {
                k: v.detach().cpu().clone() for k, v in self.discriminator.state_dict().items()
            },
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "gen": self.gen.get_state(),
            "epoch": self.epoch,
            "step": self.step,
            "history": [dict(h) for h in self.history],
        }

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], device: str | torch.device = "cpu"
    ) -> TrainState:
        """Rebuild a run saved with :meth:`state_dict` (ValueError when it does not fit)."""
        try:
            raw = dict(state["settings"])
            raw["loss"] = str(raw["loss"])
            out = cls.create(int(state["n_scales"]), TrainSettings(**raw), device=device)
            out.refiner.load_state_dict(state["refiner"])
            out.discriminator.load_state_dict(state["discriminator"])
            out.opt_g.load_state_dict(state["opt_g"])
            out.opt_d.load_state_dict(state["opt_d"])
            out.gen.set_state(state["gen"])
            out.epoch, out.step = int(state["epoch"]), int(state["step"])
            out.history = [dict(h) for h in state["history"]]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"not a refiner training state: {exc}") from exc
        return out


def _bce(logits: Tensor, target: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def train_step(
    state: TrainState, sources: Sequence[TrainImage], targets: Sequence[TrainImage]
) -> StepLosses:
    """One D update then one R update on fresh random crops."""
    cfg = state.settings
    scales, src_mask = batch_of(sources, cfg.batch, cfg.crop, state.gen)
    real, real_mask = batch_of(targets, cfg.batch, cfg.crop, state.gen)
    scales, src_mask = scales.to(state.device), src_mask.to(state.device)
    real, real_mask = real.to(state.device), real_mask.to(state.device)
    real = torch.where(real_mask, real, 0.0)
    d, r = state.discriminator.train(), state.refiner.train()

    # Real and fake crops go through D in one batch, so that its batch normalisation sees
    # both: normalising each on its own would erase exactly the global intensity and
    # contrast differences that make up a vendor's style.
    fake = generate(r, scales, src_mask)
    logits = d(torch.cat([real, fake.detach()]))
    d_real, d_fake = logits[: len(real)], logits[len(real) :]
    loss_d = _bce(d_real, 1.0) + _bce(d_fake, 0.0)
    state.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()  # type: ignore[no-untyped-call, unused-ignore]
    state.opt_d.step()

    for p in d.parameters():
        p.requires_grad_(False)
    try:
        fake_logits = d(torch.cat([real, fake]))[len(real) :]
        loss_g = _bce(fake_logits, 1.0)
        objective = loss_g if cfg.loss == "non-saturating" else -_bce(fake_logits, 0.0)
        state.opt_g.zero_grad(set_to_none=True)
        objective.backward()  # type: ignore[no-untyped-call, unused-ignore]
        state.opt_g.step()
    finally:
        for p in d.parameters():
            p.requires_grad_(True)
    state.step += 1
    return StepLosses(
        loss_d=loss_d.item(),
        loss_g=loss_g.item(),
        d_real=torch.sigmoid(d_real.detach()).mean().item(),
        d_fake=torch.sigmoid(d_fake.detach()).mean().item(),
    )


def train_epoch(
    state: TrainState,
    sources: Sequence[TrainImage],
    targets: Sequence[TrainImage],
    steps: int,
    progress: Callable[[TrainProgress], None] | None = None,
) -> dict[str, float]:
    """``steps`` training steps; appends and returns the epoch's mean losses.

    Args:
        state: the run, advanced in place (epoch, step, history, networks, optimizers).
        sources: the source images, each with the engine's scales S0.. as channels.
        targets: the target-style images (one channel each).
        steps: steps in this epoch.
        progress: receives a :class:`TrainProgress` after every step.

    Raises:
        ValueError: no sources or targets, or fewer than one step.
    """
    if not sources or not targets:
        raise ValueError("training needs at least one source and one target image")
    if steps < 1:
        raise ValueError(f"steps per epoch must be >= 1, got {steps}")
    totals = {"loss_d": 0.0, "loss_g": 0.0, "d_real": 0.0, "d_fake": 0.0}
    for n in range(steps):
        losses = train_step(state, sources, targets)
        for key in totals:
            totals[key] += getattr(losses, key)
        if progress is not None:
            progress(TrainProgress(state.epoch, n + 1, steps, losses))
    means = {key: value / steps for key, value in totals.items()}
    state.epoch += 1
    state.history.append(means)
    return means


@torch.no_grad()
def generator_loss(
    refiner: Refiner, discriminator: Discriminator, scales: Tensor, mask: Tensor, real: Tensor
) -> float:
    """−log D(R(S)) on fixed crops, judged as in training (fakes batched with ``real``
    crops, batch statistics) by a copy of D, so neither network is changed."""
    judge = copy.deepcopy(discriminator).train()
    fake = generate(refiner, scales, mask)
    return _bce(judge(torch.cat([real, fake]))[len(real) :], 1.0).item()
