"""The engine's settings: one frozen, validated dataclass (no torch import, so the node's
config can take its defaults from here and every default is written once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .errors import EngineConfigError

FeatureSource = Literal["imagenet", "seeded-random"]
Pooling = Literal["max", "avg"]
InitMode = Literal["content", "ehm"]
Optimizer = Literal["adam", "lbfgs"]
#: Left out of the fingerprint: settings that change speed, memory or reporting only, plus
#: ``weights`` and ``seed``, whose effect is the weights id (which is fingerprinted).
NOT_FINGERPRINTED = (
    "device", "amp", "max_batch", "memory_budget_mb", "report_every", "weights", "seed",
)
#: Settings a trained refiner depends on (besides the weights id).
REFINER_KEYS = (
    "patch_size", "grids", "overlap", "iterations", "lr", "alpha", "pooling", "init", "features",
    "optimizer", "warm_start",
)


@dataclass(frozen=True)
class EngineConfig:
    """Every setting of the engine; validated on construction (errors name the setting).

    Speed settings (see :mod:`mr2nst.core.engine`): tiles of one patch shape are optimised
    together, at most ``max_batch`` at a time and as many as fit ``memory_budget_mb`` by
    the engine's activation-memory estimate. ``optimizer = "lbfgs"`` (per-tile L-BFGS,
    unit steps; ``lr`` is Adam's only) and ``warm_start`` (scale k starts from the
    stitched result of scale k-1 instead of the content or EHM image) change the output;
    the METHOD-faithful defaults are Adam from the content image.
    """

    patch_size: int = 512
    grids: tuple[int, ...] = (1, 2, 4)
    overlap: float = 0.125
    iterations: int = 400
    lr: float = 0.005
    alpha: float = 1e3
    pooling: Pooling = "max"
    init: InitMode = "content"
    background_fraction: float = 0.02
    seed: int = 0
    max_batch: int = 16
    memory_budget_mb: int = 4096
    optimizer: Optimizer = "adam"
    warm_start: bool = False
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    amp: bool = True  # CUDA only
    features: FeatureSource = "imagenet"
    weights: str = ""  # vgg19-dcbb9e9d.pth; empty = torch hub cache
    report_every: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "grids", tuple(int(g) for g in self.grids))

        def bad(name: str, why: str) -> EngineConfigError:
            return EngineConfigError(f"engine.{name}: {why}, got {getattr(self, name)!r}")

        if self.patch_size < 32 or self.patch_size % 16:
            raise bad("patch_size", "must be a multiple of 16, at least 32")
        if not self.grids or any(g < 1 for g in self.grids):
            raise bad("grids", "must be a non-empty list of grid sizes >= 1")
        if not 0.0 <= self.overlap < 0.5:
            raise bad("overlap", "must be in [0, 0.5)")
        if self.iterations < 0:
            raise bad("iterations", "must be >= 0")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if not self.alpha >= 0:
            raise bad("alpha", "must be >= 0")
        if self.pooling not in get_args(Pooling):
            raise bad("pooling", f"must be one of {get_args(Pooling)}")
        if self.init not in get_args(InitMode):
            raise bad("init", f"must be one of {get_args(InitMode)}")
        if not 0.0 <= self.background_fraction <= 1.0:
            raise bad("background_fraction", "must be in [0, 1]")
        if self.max_batch < 1:
            raise bad("max_batch", "must be >= 1")
        if self.memory_budget_mb < 1:
            raise bad("memory_budget_mb", "must be >= 1")
        if self.optimizer not in get_args(Optimizer):
            raise bad("optimizer", f"must be one of {get_args(Optimizer)}")
        if self.report_every < 1:
            raise bad("report_every", "must be >= 1")
        if self.features not in get_args(FeatureSource):
            raise bad("features", f"must be one of {get_args(FeatureSource)}")
        if not (self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:")):
            raise bad("device", "must be cpu, cuda, cuda:N or auto")
