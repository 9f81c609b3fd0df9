"""A small source-vs-target domain classifier: the harness's stand-in for NIMA.

It answers a reproducible question in place of the paper's NIMA scores (whose weights
are not available; ``docs/evaluation.md``): *does a classifier that has learnt to tell
source-vendor from target-vendor images call the output "target"?* The classifier is
torchvision's ResNet18 (``weights=None``, ``num_classes=1``) with a one-channel first
convolution, trained briefly on random native-resolution crops from the breast of source
and target images held apart from the test set. Everything is seeded: the same images
and settings give the same classifier and the same answers.

An image's score is the mean probability "target" over ``crops_per_image`` crops at
seeded positions inside its breast mask; it is called target when the score is above
0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18  # type: ignore[import-untyped, unused-ignore]

from mr2nst.core.errors import ImageError

BoolImage = npt.NDArray[np.bool_]
Array = npt.NDArray[np.floating]
Sample = tuple[Array, BoolImage]  # an image (common intensity scale) and its breast mask


@dataclass(frozen=True)
class ClassifierSettings:
    """Training and prediction settings (defaults: a short CPU-friendly training)."""

    crop: int = 64
    steps: int = 150
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    crops_per_image: int = 16

    def __post_init__(self) -> None:
        if self.crop < 32 or self.steps < 1 or self.batch < 2 or self.crops_per_image < 1:
            raise ValueError("classifier: crop >= 32, steps >= 1, batch >= 2, crops_per_image >= 1")


def build_model() -> nn.Module:
    """ResNet18 from torchvision, no pretrained weights, 1 input channel, 1 logit."""
    model: nn.Module = resnet18(weights=None, num_classes=1)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def _centres(mask: BoolImage, n: int, crop: int, gen: np.random.Generator) -> npt.NDArray[np.intp]:
    """``n`` crop centres (row, col) on breast pixels whose crop fits in the image."""
    h, w = mask.shape
    half = crop // 2
    inner = np.zeros_like(mask)
    inner[half : h - (crop - half) + 1, half : w - (crop - half) + 1] = True
    rows, cols = np.nonzero(mask & inner)
    if rows.size == 0:
        rows, cols = np.nonzero(inner)
    if rows.size == 0:
        raise ImageError(f"image {mask.shape} is smaller than the classifier crop {crop}")
    pick = gen.integers(0, rows.size, size=n)
    return np.stack([rows[pick], cols[pick]], axis=1)


def crops_of(
    image: Array, mask: BoolImage, n: int, crop: int, gen: np.random.Generator
) -> npt.NDArray[np.float32]:
    """``(n, crop, crop)`` crops of ``image`` centred on random breast pixels."""
    if image.ndim != 2 or mask.shape != image.shape:
        raise ImageError(f"image {image.shape} and mask {mask.shape} must be equal 2-D shapes")
    half = crop // 2
    out = np.empty((n, crop, crop), dtype=np.float32)
    for k, (r, c) in enumerate(_centres(mask, n, crop, gen)):
        out[k] = image[r - half : r - half + crop, c - half : c - half + crop]
    return out


def _as_input(crops: npt.NDArray[np.float32]) -> torch.Tensor:
    return (torch.from_numpy(crops)[:, None] - 0.5) / 0.25


class DomainClassifier:
    """A trained classifier; :meth:`prob_target` scores one image."""

    def __init__(
        self, model: nn.Module, settings: ClassifierSettings, train_accuracy: float
    ) -> None:
        self.model = model.eval()
        self.settings = settings
        self.train_accuracy = train_accuracy  # on the last training batches (sanity check)

    @classmethod
    def train(
        cls,
        source: Sequence[Sample],
        target: Sequence[Sample],
        settings: ClassifierSettings | None = None,
    ) -> DomainClassifier:
        """Train on crops of ``source`` (label 0) and ``target`` (label 1) images.

        Args:
            source: (image, breast mask) pairs of the source domain.
            target: (image, breast mask) pairs of the target domain.
            settings: training and prediction settings; None: the defaults.

        Raises:
            ImageError: either side is empty, or an image is smaller than the crop.
        """
        s = settings or ClassifierSettings()
        if not source or not target:
            raise ImageError("the domain classifier needs source and target training images")
        gen = np.random.default_rng(s.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model = build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
        half = s.batch // 2
        labels = torch.cat([torch.zeros(half), torch.ones(half)])[:, None]
        correct: list[float] = []
        model.train()
        for step in range(s.steps):
            batch: list[npt.NDArray[np.float32]] = []
            for pool in (source, target):
                picks = gen.integers(0, len(pool), size=half)
                batch.extend(crops_of(pool[i][0], pool[i][1], 1, s.crop, gen)[0] for i in picks)
            x = _as_input(np.stack(batch))
            logits = model(x)
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call, unused-ignore]
            optimizer.step()
            if step >= s.steps - 10:
                correct.append(float(((logits > 0).float() == labels).float().mean()))
        return cls(model, s, float(np.mean(correct)))

    def prob_target(self, image: Array, mask: BoolImage) -> float:
        """Mean probability "target" over seeded crops inside the breast."""
        gen = np.random.default_rng(self.settings.seed + 1)
        crops = crops_of(image, mask, self.settings.crops_per_image, self.settings.crop, gen)
        with torch.inference_mode():
            probs = torch.sigmoid(self.model(_as_input(crops)))
        return float(probs.mean())

    def is_target(self, image: Array, mask: BoolImage) -> bool:
        """True when the image's mean probability "target" is above 0.5."""
        return self.prob_target(image, mask) > 0.5
