"""The engine's settings: one frozen, validated dataclass (no torch import, so the node's
config can take its defaults from here and every default is written once)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .errors import EngineConfigError

FeatureSource = Literal["imagenet", "hed-vgg16", "seeded-random"]
Pooling = Literal["max", "avg"]
InitMode = Literal["content", "ehm"]
Optimizer = Literal["adam", "lbfgs"]
LrSchedule = Literal["constant", "step"]
Merge = Literal["average", "bands"]
Tone = Literal["linear", "ehm"]
Resample = Literal["image", "residual"]
#: Layer names a loss may read (every feature network has them; see :mod:`.features`).
KNOWN_LAYERS = (
    "relu1_1",
    "relu1_2",
    "relu2_1",
    "relu2_2",
    "relu3_1",
    "relu3_2",
    "relu4_1",
    "relu4_2",
    "relu5_1",
)
#: The style layers, in order; ``style_weights`` gives one weight per entry.
STYLE_LAYER_NAMES = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
#: Left out of the fingerprint: settings that change speed, memory or reporting only, plus
#: ``weights`` and ``seed``, whose effect is the weights id (which is fingerprinted).
NOT_FINGERPRINTED = (
    "device",
    "amp",
    "max_batch",
    "memory_budget_mb",
    "report_every",
    "weights",
    "seed",
)
#: Settings a trained refiner depends on (besides the weights id).
REFINER_KEYS = (
    "patch_size",
    "grids",
    "overlap",
    "iterations",
    "lr",
    "alpha",
    "pooling",
    "init",
    "features",
    "optimizer",
    "warm_start",
    "content_layers",
    "pixel_weight",
    "style_weights",
    "histogram_weight",
    "lr_schedule",
    "merge",
    "resample",
)
#: METHOD.md's recipe where the defaults now differ (the paper's plain loop, the bench).
PAPER_RECIPE: dict[str, object] = {
    "lr": 0.005,
    "pooling": "max",
    "init": "content",
    "merge": "average",
    "tone": "linear",
    "detail_sigma": 0.0,
    "resample": "image",
}


@dataclass(frozen=True)
class EngineConfig:
    """Every setting of the engine; validated on construction (errors name the setting).

    Speed settings (``docs/engine.md``): tiles of one patch shape are optimized together,
    at most ``max_batch`` at a time and as many as fit ``memory_budget_mb`` by the
    engine's activation-memory estimate. ``optimizer = "lbfgs"`` (L-BFGS with a
    line search, per tile; ``lr`` is Adam's only) and ``warm_start`` (scale k starts from
    the stitched result of scale k-1 instead of the content or EHM image) change the
    output. The issue-10 levers (content layers, pixel and histogram terms, style weights,
    lr schedule, resampling, merge, detail mode, tone) are described in
    docs/configuration.md; the paper's recipe is ``merge="average"``, ``tone="linear"``,
    ``detail_sigma=0``, ``resample="image"``, ``pooling="max"``.
    """

    # Defaults: the harness's search (docs/evaluation.md, "The search") decided every lever
    # it could measure on the CPU (hed-vgg16 features, 192x160 phantoms, patch 64, 50
    # iterations, 8 tuning images never tested on); the reason stands beside each.
    patch_size: int = 512  # the paper's; the CPU search ran at patch 64 (scale 2 ~ native)
    grids: tuple[int, ...] = (1, 2, 4)  # the paper's three scales
    overlap: float = 0.125  # METHOD.md Normative; not swept
    iterations: int = 50  # 100, 400: spectrum within 0.01 at 2x, 8x the time (r2-iterations)
    lr: float = 0.02  # best spectrum/structure trade-off of 1e-4..5e-2 (t1-lr, r2-lr)
    alpha: float = 1e3  # 100: within noise; 1: texture falls back, µCs gain nothing (r2-anchor)
    pooling: Pooling = "avg"  # max: lower SSIM and detection, no better texture (t5-pooling)
    init: InitMode = (
        "content"  # vs the EHM start: spectrum 0.27 vs 0.46, sharpness 0.93 vs 0.75 (t3)
    )
    background_fraction: float = 0.02
    seed: int = 0
    max_batch: int = 16
    memory_budget_mb: int = 4096
    optimizer: Optimizer = "adam"  # L-BFGS (line search) no better, 2.4x slower (t5-optimizer)
    warm_start: bool = False  # lowers SSIM and µC detection (docs/evaluation.md, 2026-11 run)
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N
    amp: bool = True  # CUDA only
    features: FeatureSource = "imagenet"  # the paper's network, the clinical default
    weights: str = ""  # vgg19-dcbb9e9d.pth; empty = torch hub cache
    report_every: int = 10
    content_layers: tuple[str, ...] = (
        "relu4_2",
    )  # METHOD.md; shallow ones: no gain (t5, r2-anchor)
    pixel_weight: float = 0.0  # toward the start: 1e8 costs texture, 1e10 undoes it (r2-pixel)
    style_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)  # relu1_1..5_1; others: noise (t7)
    histogram_weight: float = 0.0  # Risser et al. 2017: no gain, 1.4x slower (t5-histogram)
    lr_schedule: LrSchedule = "constant"  # "step" (x0.3 at 50 %, 75 %): within noise (t5)
    merge: Merge = "bands"  # average: spectrum 0.63 vs 0.46, sharpness 0.69 vs 0.75 (t2)
    tone: Tone = "ehm"  # linear: hist W1 0.18 vs 0.045 from the content start (t3)
    detail_sigma: float = 2.0  # 0: structure SSIM 0.89 vs 0.95 (t2); r2-detail
    resample: Resample = "residual"  # image: spectrum 0.65 vs 0.46, µC CNR 0.75 vs 0.87 (t4)

    def __post_init__(self) -> None:
        """Normalise list settings to tuples, then check every setting.

        Raises:
            EngineConfigError: the first setting that breaks its rule, named
                ``engine.<key>``, with the rule and the value.
        """
        object.__setattr__(self, "grids", tuple(int(g) for g in self.grids))
        object.__setattr__(self, "content_layers", tuple(str(n) for n in self.content_layers))
        object.__setattr__(self, "style_weights", tuple(float(w) for w in self.style_weights))
        for name, valid, why in _RULES:
            value = getattr(self, name)
            if not valid(value):
                raise EngineConfigError(f"engine.{name}: {why}, got {value!r}")


def _one_of(kind: Any) -> tuple[Callable[[Any], bool], str]:
    """The rule of a Literal setting: its value is one of ``kind``'s."""
    return (lambda value: value in get_args(kind)), f"must be one of {get_args(kind)}"


def _content_layers_ok(layers: tuple[str, ...]) -> bool:
    return (
        bool(layers) and all(n in KNOWN_LAYERS for n in layers) and len(set(layers)) == len(layers)
    )


def _style_weights_ok(weights: tuple[float, ...]) -> bool:
    return (
        len(weights) == len(STYLE_LAYER_NAMES) and all(w >= 0 for w in weights) and sum(weights) > 0
    )


#: Every setting's rule, checked in this order: (name, valid(value), what it must be).
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("patch_size", lambda v: not (v < 32 or v % 16), "must be a multiple of 16, at least 32"),
    (
        "grids",
        lambda v: bool(v) and all(g >= 1 for g in v),
        "must be a non-empty list of grid sizes >= 1",
    ),
    ("overlap", lambda v: 0.0 <= v < 0.5, "must be in [0, 0.5)"),
    ("iterations", lambda v: not v < 0, "must be >= 0"),
    ("lr", lambda v: v > 0, "must be > 0"),
    ("alpha", lambda v: v >= 0, "must be >= 0"),
    ("pooling", *_one_of(Pooling)),
    ("init", *_one_of(InitMode)),
    ("background_fraction", lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"),
    ("max_batch", lambda v: not v < 1, "must be >= 1"),
    ("memory_budget_mb", lambda v: not v < 1, "must be >= 1"),
    ("optimizer", *_one_of(Optimizer)),
    ("report_every", lambda v: not v < 1, "must be >= 1"),
    ("features", *_one_of(FeatureSource)),
    ("content_layers", _content_layers_ok, f"must be distinct names from {KNOWN_LAYERS}"),
    (
        "style_weights",
        _style_weights_ok,
        f"must be {len(STYLE_LAYER_NAMES)} weights >= 0, not all 0",
    ),
    ("pixel_weight", lambda v: v >= 0, "must be >= 0"),
    ("histogram_weight", lambda v: v >= 0, "must be >= 0"),
    ("detail_sigma", lambda v: v >= 0, "must be >= 0"),
    ("lr_schedule", *_one_of(LrSchedule)),
    ("merge", *_one_of(Merge)),
    ("tone", *_one_of(Tone)),
    ("resample", *_one_of(Resample)),
    (
        "device",
        lambda v: v in ("cpu", "cuda", "auto") or v.startswith("cuda:"),
        "must be cpu, cuda, cuda:N or auto",
    ),
)
