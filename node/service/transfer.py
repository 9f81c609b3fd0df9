"""``mr2nst transfer``: the node's pipeline run offline on files, writing derived DICOM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from tqdm import tqdm

from mr2nst.node.config import Config
from mr2nst.node.dicom.scu import iter_files, read_file
from mr2nst.node.errors import ConfigError, NodeError
from mr2nst.node.methods.registry import FACTORIES, MethodCache
from mr2nst.node.service.pipeline import Pipeline

if TYPE_CHECKING:
    from mr2nst.core.engine import Progress


class TransferRow(TypedDict):
    """The outcome for one input file."""

    input: str
    output: str | None  # the derived file; None when it failed
    error: str  # empty on success


def run_transfer(
    config: Config, inputs: Sequence[str], out: Path, *, method: str, progress: bool = False
) -> list[TransferRow]:
    """Transform every input file with the node's pipeline, writing derived DICOM to ``out``.

    Args:
        config: the node's configuration (engine, bank, derived series).
        inputs: files and folders (searched recursively).
        out: where the derived files go (created).
        method: the method to run.
        progress: show progress bars.

    Returns:
        One row per input file, in order.

    Raises:
        ConfigError: ``method`` is not available or its settings are unusable (e.g. a
            ``fast`` checkpoint trained for another teacher).
        WeightsError: the method's weights are missing or corrupt.
    """
    if method not in FACTORIES:
        raise ConfigError(
            f"--method: {method!r} is not available (available: {', '.join(sorted(FACTORIES))})"
        )
    out.mkdir(parents=True, exist_ok=True)
    tiles = tqdm(desc="tiles", unit="tile", disable=not progress, position=1, leave=False)

    def on_progress(p: Progress) -> None:
        tiles.total = p.tiles_total
        tiles.n = p.tiles_done
        tiles.set_postfix(scale=p.scale, iteration=p.iteration, loss=f"{p.loss:.4g}", refresh=True)

    methods = MethodCache(config, progress=on_progress)
    methods.get(method)  # a method that cannot be built stops the run before any file
    pipeline = Pipeline(config, methods)
    results: list[TransferRow] = []
    for path in tqdm(list(iter_files(inputs)), desc="transfer", unit="image", disable=not progress):
        result: TransferRow = {"input": str(path), "output": None, "error": ""}
        try:
            derived = pipeline.derive(read_file(path), method)
            target = out / f"{derived.SOPInstanceUID}.dcm"
            derived.save_as(target, enforce_file_format=True)
            result["output"] = str(target)
        except (ValueError, NodeError, OSError) as exc:
            result["error"] = str(exc)
        results.append(result)
    tiles.close()
    return results
