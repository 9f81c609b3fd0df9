"""The refiner that merges the scales: ``M = r(w0·S0 + ... + w_{n-1}·S_{n-1})`` (METHOD.md).

``w`` starts at ``1/n``; ``r`` is three 1×1 convolutions built residual,
``r(x) = x + conv3(act(conv2(act(conv1(x)))))``, with ``conv3`` zero-initialised
(weight and bias). The untrained refiner is therefore exactly the plain average of the
scales (Normative). ``conv1``/``conv2`` are initialised from a fixed seed, so an
untrained refiner always has the same parameters (and the same :meth:`Refiner.id`).

Checkpoints are dicts ``{"state_dict", "hidden", "engine_config", "weights_id"}`` plus,
for a trained refiner, ``"training"`` (plain metadata: epochs, steps, seed, settings,
per-epoch losses; see :func:`checkpoint_info`). A refiner is only valid for the engine
setup it was trained on, and :func:`load_refiner` refuses any other, naming what differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RefinerError

_INIT_SEED = 0


class Refiner(nn.Module):
    """Learnable scale weights plus a residual 1×1-conv refiner; identity-average when untrained."""

    def __init__(self, n_scales: int, hidden: int = 8) -> None:
        super().__init__()
        if n_scales < 1 or hidden < 1:
            raise ValueError(f"need n_scales >= 1 and hidden >= 1, got {n_scales}, {hidden}")
        self.n_scales = n_scales
        self.hidden = hidden
        self.scale_weights = nn.Parameter(torch.full((n_scales,), 1.0 / n_scales))
        self.conv1 = nn.Conv2d(1, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, 1)
        self.conv3 = nn.Conv2d(hidden, 1, 1)
        self.act = nn.LeakyReLU(0.2)
        gen = torch.Generator().manual_seed(_INIT_SEED)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                nn.init.kaiming_uniform_(
                    conv.weight, a=0.2, nonlinearity="leaky_relu", generator=gen
                )
                nn.init.zeros_(self._bias(conv))
            nn.init.zeros_(self.conv3.weight)
            nn.init.zeros_(self._bias(self.conv3))

    @staticmethod
    def _bias(conv: nn.Conv2d) -> Tensor:
        assert conv.bias is not None
        return conv.bias

    def mix(self, scales: Tensor) -> Tensor:
        """``Σ w_k · S_k`` of ``(N, n_scales, H, W)`` -> ``(N, 1, H, W)``."""
        if scales.ndim != 4 or scales.shape[1] != self.n_scales:
            raise ValueError(
                f"expected (N, {self.n_scales}, H, W) scales, got {tuple(scales.shape)}"
            )
        w = self.scale_weights.to(scales.dtype).view(1, -1, 1, 1)
        return (scales * w).sum(dim=1, keepdim=True)

    def forward(self, scales: Tensor) -> Tensor:
        """``r(Σ w_k · S_k)`` of ``(N, n_scales, H, W)`` -> ``(N, 1, H, W)``."""
        x = self.mix(scales)
        out: Tensor = x + self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return out

    def id(self) -> str:
        """A stable content hash of the parameters (for fingerprints)."""
        digest = hashlib.sha256(f"refiner:{self.n_scales}:{self.hidden}".encode())
        for name, value in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def save_refiner(
    refiner: Refiner,
    path: str | Path,
    expected: Mapping[str, Any],
    training: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint with the engine setup it belongs to.

    ``expected`` is :meth:`mr2nst.core.engine.Mr2nstEngine.refiner_expectation`'s dict,
    ``{"engine_config": {...}, "weights_id": "..."}``; ``training`` is optional metadata
    of plain values (str, numbers, lists, dicts) describing how it was trained.
    """
    checkpoint: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu() for k, v in refiner.state_dict().items()},
        "hidden": refiner.hidden,
        "engine_config": dict(expected["engine_config"]),
        "weights_id": str(expected["weights_id"]),
    }
    if training is not None:
        checkpoint["training"] = dict(training)
    torch.save(checkpoint, Path(path))


def _mismatches(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    problems = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key, "<missing>"), expected.get(key, "<missing>")
        if isinstance(a, list | tuple) and isinstance(b, list | tuple):
            a, b = list(a), list(b)
        if a != b:
            problems.append(f"engine_config.{key}: checkpoint {a!r}, engine {b!r}")
    return problems


def _read(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise RefinerError(f"refiner checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means an unusable file
        raise RefinerError(f"cannot read refiner checkpoint {path}: {exc}") from exc
    if not isinstance(raw, Mapping) or not {"state_dict", "engine_config", "weights_id"} <= set(
        raw
    ):
        raise RefinerError(
            f"{path} is not a refiner checkpoint (needs state_dict, engine_config, weights_id)"
        )
    return raw


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """What a checkpoint says about itself, without its parameters:
    ``{"engine_config", "weights_id", "training"}`` (``training`` is ``{}`` when absent)."""
    raw = _read(Path(path))
    return {
        "engine_config": dict(raw["engine_config"]),
        "weights_id": str(raw["weights_id"]),
        "training": dict(raw.get("training") or {}),
    }


def load_refiner(path: str | Path, expected: Mapping[str, Any]) -> Refiner:
    """Read a checkpoint and check it was trained for ``expected``.

    Args:
        path: the checkpoint written by :func:`save_refiner`.
        expected: the engine's :meth:`~mr2nst.core.engine.Mr2nstEngine.refiner_expectation`.

    Returns:
        The refiner, on the CPU.

    Raises:
        RefinerError: a missing or unreadable file, one that is not a refiner checkpoint,
            one trained for another weights id or engine setup (every difference named),
            or parameters that do not fit.
    """
    path = Path(path)
    raw = _read(path)
    problems = []
    if raw["weights_id"] != expected["weights_id"]:
        problems.append(
            f"weights_id: checkpoint {raw['weights_id']!r}, engine {expected['weights_id']!r}"
        )
    problems += _mismatches(raw["engine_config"], expected["engine_config"])
    if problems:
        raise RefinerError(
            f"refiner {path} was trained for another engine setup: " + "; ".join(problems)
        )
    state = raw["state_dict"]
    try:
        refiner = Refiner(int(state["scale_weights"].shape[0]), int(raw.get("hidden", 8)))
        refiner.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, ValueError, AttributeError) as exc:
        raise RefinerError(f"{path}: state_dict does not fit the refiner: {exc}") from exc
    return refiner
