"""A small lesion detector for the detection study: the CAD that is tuned on UIH images.

CenterNet-style (Zhou et al. 2019, "Objects as Points"): a small encoder-decoder (3×3
convolutions, group normalization, ReLU; a U-Net from full resolution down to stride
``2**depth`` and back up to ``out_stride``) maps an image ``(N, 1, H, W)`` to one heatmap
per lesion type (:data:`KINDS`) at ``out_stride``; a lesion is a peak there. The rules,
written once here:

- **Targets.** A lesion's centre pixel falls in the output cell ``round((p - (s - 1) / 2)
  / s)`` (``s`` = ``out_stride``; cell ``i`` covers pixels ``[i s, (i + 1) s)``, centre
  ``i s + (s - 1) / 2``). Its target is a Gaussian around that cell, peak exactly 1, σ =
  ``max(min_sigma, sigma_frac · radius) / s`` cells; lesions of a type share a channel
  (maximum where they overlap).
- **Loss.** The penalty-reduced pixel-wise focal loss (α 2, β 4), summed and divided by
  the number of lesions in the batch.
- **Training.** Random init, Adam with cosine decay to 10 %, random horizontal and
  vertical flips (the lesions move with the image); batches hold images of one padded
  shape. Everything is seeded.
- **Decoding.** Sigmoid; a cell is a peak when it is the maximum of its window (max
  pooling, a window per type in pixels); the ``max_per_kind`` best peaks per type above
  ``min_score``, mapped back to the centre pixel of their cell.

A ``calc`` lesion is a µC *cluster*: :func:`calc_clusters` groups a phantom's µCs by
single linkage. Images of any size are zero-padded to a multiple of ``2**depth`` (the
background of a mammogram is 0) and the heatmaps cropped back.

The defaults were measured on phantoms (192x160, UIH rendering; 40 training cases, 20
test cases, 2 CPU threads): 60 epochs train in about 30 s; test AP mass 0.65, calc 0.98.
At depth 3, test AP (mass / calc) was 0.2 / 0.1 without normalization (it barely learnt
in 60 epochs), 0.25 / 0.88 with batch normalization (overfitting) and 0.52 / 0.93 with
group normalization. Mass AP moves by about ±0.05 with the seed (40 test masses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from mr2nst.core.lab.detection_eval import Detection, Lesion

KINDS = ("mass", "calc")

FloatArray = npt.NDArray[np.float32]


def _spread(image_shape: tuple[int, int] | None) -> float:
    """The phantom's µC cluster spread (pixels) for an image of this shape."""
    if image_shape is None:
        return 9.0
    return max(9.0, 0.012 * min(image_shape))


def calc_clusters(
    calcs: npt.ArrayLike,
    link: float | None = None,
    image_shape: tuple[int, int] | None = None,
) -> list[tuple[float, float, float]]:
    """Group µCs into clusters by single linkage.

    Args:
        calcs: ``(N, 3)``: row, col, diameter of each µC.
        link: members closer than this (pixels) are one cluster; None: 1.5 × the
            phantom's spread, ``max(9, 0.012 · min(h, w))`` (9 without ``image_shape``).
            On 120 phantoms of 192x160, 1.5 × spread recovers the two planted clusters
            most often (76 % of cases; 2.5 × spread: 62 %): planted clusters may touch.
        image_shape: ``(h, w)`` of the image, for the default link.

    Returns:
        ``(row, col, radius)`` per cluster, sorted by row then col: the members'
        centroid and ``max(6, largest member distance from it + 3)``.
    """
    points = np.asarray(calcs, dtype=np.float64).reshape(-1, 3)[:, :2]
    if link is None:
        link = 1.5 * _spread(image_shape)
    n = len(points)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    distance = np.hypot(*(points[:, None, :] - points[None, :, :]).transpose(2, 0, 1))
    for i, j in zip(*np.nonzero(np.triu(distance < link, k=1)), strict=True):
        parent[root(int(i))] = root(int(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    out = []
    for members in groups.values():
        centre = points[members].mean(axis=0)
        reach = float(np.hypot(*(points[members] - centre).T).max())
        out.append((float(centre[0]), float(centre[1]), max(6.0, reach + 3.0)))
    return sorted(out)


def lesions_from_truth(
    image: str, truth: dict[str, Any], link: float | None = None
) -> list[Lesion]:
    """The lesions of a phantom's ground truth (its JSON: ``calcs``, ``masses``, ``rows``,
    ``columns``): masses (radius at least 4 pixels), then µC clusters
    (:func:`calc_clusters`)."""
    shape = (int(truth["rows"]), int(truth["columns"]))
    masses = np.asarray(truth.get("masses", []), dtype=np.float64).reshape(-1, 3)
    calcs = np.asarray(truth.get("calcs", []), dtype=np.float64).reshape(-1, 3)
    out = [Lesion(image, float(c), float(r), max(float(q), 4.0), "mass") for r, c, q in masses]
    out += [
        Lesion(image, c, r, q, "calc") for r, c, q in calc_clusters(calcs, link, image_shape=shape)
    ]
    return out


@dataclass(frozen=True)
class DetectorConfig:
    """The network and its heatmaps.

    Attributes:
        width: channels at the first levels (doubling from the second stride-2 level on).
        depth: stride-2 levels of the encoder (padding multiple ``2**depth``).
        out_stride: the heatmaps' stride (a power of 2, at most ``2**depth``).
        sigma_frac, min_sigma: a target's σ in pixels, ``max(min_sigma, sigma_frac · r)``.
        windows: the peak windows in pixels, per type of :data:`KINDS`. A phantom's µC
            cluster (radius 6-27 px at 192x160) is wider than its masses (3-7 px); calc
            windows of 5 px left duplicate peaks on a cluster (calc AP 0.86 vs 0.98).
        prior: the heatmaps' initial probability (the head's bias).
    """

    width: int = 16
    depth: int = 4
    out_stride: int = 2
    sigma_frac: float = 1 / 3
    min_sigma: float = 1.0
    windows: tuple[int, ...] = (9, 11)
    prior: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", tuple(self.windows))  # a list from JSON
        if not 4 <= self.width <= 128 or self.width % 4:
            raise ValueError(f"width: must be a multiple of 4 in 4..128, got {self.width}")
        if not 1 <= self.depth <= 5:
            raise ValueError(f"depth: must be 1..5, got {self.depth}")
        s = self.out_stride
        if s < 1 or s & (s - 1) or s > 2**self.depth:
            raise ValueError(f"out_stride: must be a power of 2 <= {2**self.depth}, got {s}")
        if len(self.windows) != len(KINDS) or min(self.windows) < 1:
            raise ValueError(f"windows: one size >= 1 per kind {KINDS}, got {self.windows}")
        if not 0 < self.prior < 1:
            raise ValueError(f"prior: must be in (0, 1), got {self.prior}")

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return asdict(self)


@dataclass(frozen=True)
class DetectorSettings:
    """How the detector is trained.

    Attributes:
        epochs: passes over the training images.
        batch: images per step (of one padded shape).
        lr: Adam's learning rate (cosine decay to 10 % over all epochs).
        weight_decay: Adam's L2 weight decay.
        seed: initialisation, batch order and flips.
        flips: random horizontal and vertical flips.
    """

    epochs: int = 60
    batch: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    flips: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the checkpoint."""
        return asdict(self)


@dataclass
class Sample:
    """One training image (float32 ``(H, W)`` in [0, 1]) and its lesions."""

    name: str
    image: FloatArray
    lesions: list[Lesion]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3×3 convolution, group normalization (4 groups), ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(4, cout), nn.ReLU()
    )


class Detector(nn.Module):
    """``(N, 1, H, W)`` -> heatmap logits ``(N, len(KINDS), H / s, W / s)``, H and W
    multiples of ``2**depth`` (:func:`detect` pads)."""

    def __init__(self, config: DetectorConfig = DetectorConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.width

        def channels(level: int) -> int:
            return w << max(0, level - 1)

        self.stem = _conv(1, w)
        self.down = nn.ModuleList(
            nn.Sequential(
                _conv(channels(k), channels(k + 1), 2), _conv(channels(k + 1), channels(k + 1))
            )
            for k in range(config.depth)
        )
        self.top = int(math.log2(config.out_stride))  # the output level
        self.up = nn.ModuleList(
            _conv(channels(k + 1) + channels(k), channels(k)) for k in range(self.top, config.depth)
        )
        c = channels(self.top)
        self.head = nn.Sequential(_conv(c, c), nn.Conv2d(c, len(KINDS), 1))
        out = self.head[-1]
        assert isinstance(out, nn.Conv2d) and out.bias is not None
        nn.init.constant_(out.bias, math.log(config.prior / (1 - config.prior)))

    def forward(self, x: Tensor) -> Tensor:
        """Heatmap logits, one channel per kind."""
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in reversed(self.up):
            skip = skips.pop()
            y = up(torch.cat([F.interpolate(y, size=skip.shape[-2:], mode="nearest"), skip], 1))
        logits: Tensor = self.head(y)
        return logits


def _padded(shape: tuple[int, int], multiple: int) -> tuple[int, int]:
    return (-(-shape[0] // multiple) * multiple, -(-shape[1] // multiple) * multiple)


def cell_of(pixel: float, stride: int) -> int:
    """The output cell whose pixels hold ``pixel`` (a row or column, pixel centres)."""
    return int(math.floor((pixel - (stride - 1) / 2) / stride + 0.5))


def pixel_of(cell: int, stride: int) -> float:
    """The centre pixel of output cell ``cell``."""
    return cell * stride + (stride - 1) / 2


def target_heatmaps(
    lesions: Sequence[Lesion], shape: tuple[int, int], config: DetectorConfig
) -> FloatArray:
    """The training target ``(len(KINDS), h, w)`` on an output grid of ``shape`` cells."""
    s = config.out_stride
    h, w = shape
    out = np.zeros((len(KINDS), h, w), dtype=np.float32)
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(w, dtype=np.float32)[None, :]
    for lesion in lesions:
        i, j = cell_of(lesion.y, s), cell_of(lesion.x, s)
        if not (0 <= i < h and 0 <= j < w):
            continue
        sigma = max(config.min_sigma, config.sigma_frac * lesion.radius) / s
        blob = np.exp(-((rows - i) ** 2 + (cols - j) ** 2) / np.float32(2 * sigma * sigma))
        k = KINDS.index(lesion.kind)
        np.maximum(out[k], blob, out=out[k])
        out[k, i, j] = 1.0
    return out


def focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (α 2, β 4), summed and divided
    by the number of lesions (cells where ``target`` is 1; at least 1)."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    pos = -torch.log(p) * (1 - p) ** 2 * positive
    neg = -torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - positive)
    return (pos.sum() + neg.sum()) / positive.sum().clamp(min=1)


def _flipped(sample: Sample, vertical: bool, horizontal: bool) -> tuple[FloatArray, list[Lesion]]:
    """The image and its lesions, flipped."""
    image = np.asarray(sample.image, dtype=np.float32)
    h, w = image.shape
    lesions = list(sample.lesions)
    if vertical:
        image = image[::-1]
        lesions = [Lesion(x.image, x.x, h - 1 - x.y, x.radius, x.kind) for x in lesions]
    if horizontal:
        image = image[:, ::-1]
        lesions = [Lesion(x.image, w - 1 - x.x, x.y, x.radius, x.kind) for x in lesions]
    return np.ascontiguousarray(image), lesions


def _example(
    sample: Sample, vertical: bool, horizontal: bool, config: DetectorConfig
) -> tuple[Tensor, Tensor]:
    """A padded image ``(1, Hp, Wp)`` and its target ``(len(KINDS), Hp / s, Wp / s)``."""
    image, lesions = _flipped(sample, vertical, horizontal)
    hp, wp = _padded(image.shape, 2**config.depth)
    x = np.zeros((1, hp, wp), dtype=np.float32)
    x[0, : image.shape[0], : image.shape[1]] = image
    s = config.out_stride
    y = target_heatmaps(lesions, (hp // s, wp // s), config)
    return torch.from_numpy(x), torch.from_numpy(y)


def train_detector(
    samples: Sequence[Sample],
    config: DetectorConfig = DetectorConfig(),
    settings: DetectorSettings = DetectorSettings(),
    progress: Callable[[int, float], None] | None = None,
    device: str = "cpu",
) -> tuple[Detector, list[float]]:
    """Train a detector from random init on ``samples``.

    Args:
        samples: the training images and their lesions (any sizes).
        config: the network and its heatmaps.
        settings: the training settings.
        progress: called after every epoch with its number (from 1) and mean loss.
        device: where to train (the initialisation is drawn on the CPU, so it is the same
            on every device).

    Returns:
        The trained detector (eval mode) and the mean loss of every epoch.
    """
    if not samples:
        raise ValueError("no training images")
    rng = np.random.default_rng(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        detector = Detector(config)
    detector.to(device)
    optimizer = torch.optim.Adam(
        detector.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    cache: dict[tuple[int, bool, bool], tuple[Tensor, Tensor]] = {}
    multiple = 2**config.depth
    by_shape: dict[tuple[int, int], list[int]] = {}
    for n, sample in enumerate(samples):
        by_shape.setdefault(_padded(sample.image.shape, multiple), []).append(n)
    losses: list[float] = []
    detector.train()
    for epoch in range(settings.epochs):
        for group in optimizer.param_groups:  # cosine decay to 10 % of lr
            group["lr"] = settings.lr * (0.55 + 0.45 * math.cos(math.pi * epoch / settings.epochs))
        batches = []
        for members in by_shape.values():
            order = [members[i] for i in rng.permutation(len(members))]
            batches += [order[i : i + settings.batch] for i in range(0, len(order), settings.batch)]
        total = 0.0
        for b in rng.permutation(len(batches)):
            xs, ys = [], []
            for n in batches[b]:
                flips = rng.random(2) < 0.5 if settings.flips else (False, False)
                key = (n, bool(flips[0]), bool(flips[1]))
                if key not in cache:
                    cache[key] = _example(samples[n], key[1], key[2], config)
                xs.append(cache[key][0])
                ys.append(cache[key][1])
            x, y = torch.stack(xs).to(device), torch.stack(ys).to(device)
            loss = focal_loss(detector(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call, unused-ignore]
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / len(batches))
        if progress is not None:
            progress(epoch + 1, losses[-1])
    detector.eval()
    return detector, losses


def heatmaps(detector: Detector, image: npt.ArrayLike, device: str = "cpu") -> FloatArray:
    """The probability heatmaps ``(len(KINDS), ceil(H / s), ceil(W / s))`` of one image
    (the detector is moved to ``device`` and set to eval mode)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected an (H, W) image, got shape {img.shape}")
    config = detector.config
    hp, wp = _padded(img.shape, 2**config.depth)
    x = torch.zeros(1, 1, hp, wp)
    x[0, 0, : img.shape[0], : img.shape[1]] = torch.from_numpy(img)
    s = config.out_stride
    detector.eval()
    with torch.no_grad():
        prob = torch.sigmoid(detector.to(device)(x.to(device)))[0].cpu()
    return prob[:, : -(-img.shape[0] // s), : -(-img.shape[1] // s)].numpy()


def detect(
    detector: Detector,
    image: npt.ArrayLike,
    name: str,
    *,
    max_per_kind: int = 20,
    min_score: float = 0.01,
    device: str = "cpu",
) -> list[Detection]:
    """The detections of one image.

    Args:
        detector: a trained detector (moved to ``device``, set to eval mode).
        image: float ``(H, W)`` in [0, 1], any size.
        name: the image's name, for the detections.
        max_per_kind: at most this many detections per type.
        min_score: the lowest peak probability kept.
        device: where to run the network.

    Returns:
        Per type of :data:`KINDS`, the best heatmap peaks in descending score, each at
        the centre pixel of its cell (x = column, y = row, inside the image).
    """
    img = np.asarray(image, dtype=np.float32)
    prob = torch.from_numpy(heatmaps(detector, img, device))
    s = detector.config.out_stride
    h, w = img.shape
    out: list[Detection] = []
    for k, kind in enumerate(KINDS):
        size = max(1, round(detector.config.windows[k] / s))
        size += 1 - size % 2  # odd, so that the window is centred
        heat = prob[k][None, None]
        peaks = F.max_pool2d(heat, size, stride=1, padding=size // 2)
        keep = (heat == peaks) & (heat >= min_score)
        scores = heat[keep]
        cells = torch.nonzero(keep[0, 0])
        order = torch.argsort(scores, descending=True, stable=True)[:max_per_kind]
        for n in order.tolist():
            i, j = (int(v) for v in cells[n])
            y = min(max(pixel_of(i, s), 0.0), h - 1.0)
            x = min(max(pixel_of(j, s), 0.0), w - 1.0)
            out.append(Detection(name, x, y, float(scores[n]), kind))
    return out


__all__ = [
    "KINDS",
    "Detector",
    "DetectorConfig",
    "DetectorSettings",
    "Sample",
    "calc_clusters",
    "cell_of",
    "detect",
    "focal_loss",
    "heatmaps",
    "lesions_from_truth",
    "pixel_of",
    "target_heatmaps",
    "train_detector",
]
