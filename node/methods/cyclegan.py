"""Method ``cyclegan``: the CycleGAN baseline's GE → UIH generator (issue 15).

Everything around the generator is the ``mr2nst`` method's: the breast is segmented,
the references are selected and the content is scaled robustly to [0, 1] (background
0), exactly as the generator saw its training crops (``mr2nst train-cyclegan``). One
tiled pass of the generator (:mod:`mr2nst.core.cyclegan`) then replaces the engine's
optimization, and its output is mapped to the target domain with the same tone step
(``[engine] tone``: the bank's robust range, or the references' exact histogram).
The references serve only that tone step; the generator itself sees the source alone.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from mr2nst.bank.bank import Bank
from mr2nst.core.cyclegan import CYCLEGAN_REVISION, Generator, GeneratorConfig, run_generator
from mr2nst.core.engine import EngineConfig, EngineResult
from mr2nst.core.intensity import FloatImage
from mr2nst.core.method import MethodResult
from mr2nst.node.errors import ConfigError
from mr2nst.node.methods.mr2nst import Mr2nstMethod, Prepared, ProgressSink

#: What a CycleGAN checkpoint says it is.
CHECKPOINT_KIND = "mr2nst-cyclegan"


def parameter_count(generator: Generator) -> int:
    """How many weights ``generator`` has."""
    return sum(p.numel() for p in generator.parameters())


def weights_id(generator: Generator) -> str:
    """A short content hash of ``generator``'s parameters (for provenance)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(generator.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class CycleGanCheckpoint:
    """A loaded CycleGAN checkpoint.

    Attributes:
        g: the GE → UIH generator, in eval mode.
        config: its architecture and inference tile.
        training: the training summary (folders, images, epochs, losses, seconds).
        data: the whole checkpoint dict (``resume`` included), for ``train-cyclegan --resume``.
    """

    g: Generator
    config: GeneratorConfig
    training: dict[str, Any]
    data: dict[str, Any]


def load_checkpoint(path: str | Path) -> CycleGanCheckpoint:
    """Read a checkpoint written by ``mr2nst train-cyclegan``.

    Raises:
        ConfigError: the file is missing, unreadable, not a CycleGAN checkpoint, of another
            revision, or its weights do not fit its architecture.
    """
    where = f"cyclegan.checkpoint {str(path)!r}"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file (train one: mr2nst train-cyclegan)") from None
    except Exception as exc:  # edge: a corrupt or foreign file, whatever torch raises
        raise ConfigError(
            f"{where}: not a readable checkpoint ({exc.__class__.__name__})"
        ) from None
    if not isinstance(data, dict) or data.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(f"{where}: not a CycleGAN checkpoint (written by train-cyclegan)")
    if data.get("revision") != CYCLEGAN_REVISION:
        raise ConfigError(
            f"{where}: CycleGAN revision {data.get('revision')}, this build needs "
            f"{CYCLEGAN_REVISION}; retrain with mr2nst train-cyclegan"
        )
    try:
        config = GeneratorConfig(**data["generator"])
        g = Generator(config)
        g.load_state_dict(data["g"])
    except Exception as exc:  # edge: keys or shapes that do not fit the architecture
        message = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ConfigError(f"{where}: does not fit the generator architecture ({message})") from None
    return CycleGanCheckpoint(g.eval(), config, dict(data.get("training") or {}), data)


class GeneratorEngine:
    """Stands in for the engine inside the ``mr2nst`` method: one generator pass per image.

    Args:
        generator: the trained GE → UIH generator.
        engine_config: the ``[engine]`` settings; only ``tone`` is used (``init`` is set to
            ``content``: the generator starts from the scaled source, so no EHM start is made).
        tile: the inference tile (0: the generator's own).
        device: where the generator runs.
    """

    def __init__(
        self,
        generator: Generator,
        engine_config: EngineConfig,
        tile: int = 0,
        device: str = "cpu",
    ) -> None:
        self.generator = generator.eval().to(device)
        self._config = replace(engine_config, init="content")
        self.tile = tile or generator.config.tile
        self.device = device
        self._weights = weights_id(generator)

    @property
    def config(self) -> EngineConfig:
        """The engine settings the method reads (``tone``; ``init`` is ``content``)."""
        return self._config

    @property
    def weights_id(self) -> str:
        """``cyclegan:<hash of the generator's weights>``."""
        return f"cyclegan:{self._weights}"

    def fingerprint(self) -> str:
        """The generator's weights, architecture and tile, and the tone step."""
        cfg = self.generator.config
        return (
            f"cyclegan-r{CYCLEGAN_REVISION}-{self._weights}-w{cfg.width}d{cfg.depth}"
            f"b{cfg.blocks}-t{self.tile}-tone-{self._config.tone}"
        )

    def transfer(
        self,
        content: FloatImage,
        content_mask: npt.NDArray[np.bool_],
        references: Sequence[FloatImage],
        *,
        background: float = 0.0,
        init: FloatImage | None = None,
        progress: ProgressSink | None = None,
    ) -> EngineResult:
        """The generator's output for ``content`` (background 0, as in training); ``init``
        and the references are not used."""
        started = time.perf_counter()
        source = np.where(content_mask, content, np.float32(0.0)).astype(np.float32)
        with torch.no_grad():
            image = run_generator(self.generator, source, tile=self.tile, device=self.device)
        image = np.clip(image, 0.0, 1.0)
        image[~content_mask] = np.float32(background)
        return EngineResult(
            image=image.astype(np.float32),
            scales=(),
            tiles_optimized=0,
            tiles_skipped=0,
            final_losses=(),
            seconds=time.perf_counter() - started,
        )


class CycleGanMethod(Mr2nstMethod):
    """The ``mr2nst`` method with the CycleGAN generator in place of the engine.

    Args:
        engine: the :class:`GeneratorEngine`.
        (the rest): as :class:`~mr2nst.node.methods.mr2nst.Mr2nstMethod`.
        checkpoint_name: the checkpoint's file name, for provenance.
    """

    name = "cyclegan"

    def __init__(
        self,
        engine: GeneratorEngine,
        bank: Bank,
        references: int,
        allow_fewer: bool,
        version: str,
        checkpoint_name: str = "",
    ) -> None:
        super().__init__(engine, bank, references, allow_fewer, version)
        self.checkpoint_name = checkpoint_name

    def fingerprint(self) -> str:
        """Method, version, generator, tone, k and bank content."""
        return (
            f"cyclegan-{self.version}-{self.engine.fingerprint()}"
            f"-k{self.references}-bank{self.bank_id()}"
        )

    def finish(self, unit: FloatImage, prepared: Prepared, result: EngineResult) -> MethodResult:
        """The ``mr2nst`` method's tone mapping; provenance names the generator."""
        out = super().finish(unit, prepared, result)
        engine = self.engine
        assert isinstance(engine, GeneratorEngine)
        cfg = engine.generator.config
        notes = (
            f"generator width {cfg.width} depth {cfg.depth} blocks {cfg.blocks} "
            f"({parameter_count(engine.generator)} parameters)",
            f"checkpoint {self.checkpoint_name or 'unnamed'}",
            f"tile {engine.tile}",
            f"tone {engine.config.tone}",
        )
        provenance = replace(out.provenance, method=self.name, scales=(), notes=notes)
        return replace(out, provenance=provenance)


def cyclegan_method(
    path: str | Path,
    engine_config: EngineConfig,
    bank: Bank,
    references: int,
    allow_fewer: bool,
    version: str,
    *,
    tile: int = 0,
    device: str = "cpu",
) -> tuple[CycleGanMethod, CycleGanCheckpoint]:
    """The ``cyclegan`` method of the generator at ``path`` (no VGG engine is built).

    Args:
        path: the checkpoint of ``mr2nst train-cyclegan``.
        engine_config: the ``[engine]`` settings: their ``tone`` maps the output.
        bank: the reference bank (its range, and the references for tone ``ehm``).
        references: how many references to select (``k``).
        allow_fewer: accept fewer than ``k`` when the bank has fewer of the view.
        version: the node version, part of the fingerprint.
        tile: the inference tile (0: the checkpoint's).
        device: where the generator runs.

    Raises:
        ConfigError: the checkpoint cannot be read or does not fit.
    """
    checkpoint = load_checkpoint(path)
    if tile and tile % checkpoint.config.stride:
        raise ConfigError(
            f"cyclegan.tile: must be a multiple of the generator's stride "
            f"{checkpoint.config.stride}, got {tile}"
        )
    engine = GeneratorEngine(checkpoint.g, engine_config, tile=tile, device=device)
    method = CycleGanMethod(
        engine, bank, references, allow_fewer, version, checkpoint_name=Path(path).name
    )
    return method, checkpoint
