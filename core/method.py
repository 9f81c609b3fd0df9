"""The interface every normalization method implements: image in, image out, plus provenance.

A method sees only a float image (see :mod:`mr2nst.core.intensity`) and a little
metadata about it; the node does all DICOM decoding and encoding around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .intensity import FloatImage, StoredRange


@dataclass(frozen=True)
class SourceInfo:
    """What a method may know about its input besides the pixels."""

    view: str = ""  # "CC", "MLO", ... ("" when unknown)
    laterality: str = ""  # "L", "R" or ""
    pixel_spacing_mm: tuple[float, float] | None = None
    manufacturer: str = ""


@dataclass(frozen=True)
class Provenance:
    """How an output was made; stamped into the derived series."""

    method: str
    engine_version: str
    references: tuple[str, ...] = ()
    scales: tuple[int, ...] = ()
    features: str = ""
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One human-readable line for DerivationDescription."""
        parts = [f"mr2nst {self.engine_version} method={self.method}"]
        if self.scales:
            parts.append("scales=" + "/".join(str(g) for g in self.scales))
        if self.references:
            parts.append(f"references={len(self.references)}: " + ",".join(self.references))
        if self.features:
            parts.append(f"features={self.features}")
        parts.extend(self.notes)
        return "; ".join(parts)


@dataclass(frozen=True)
class MethodResult:
    """A method's output image and provenance.

    ``target_range`` is the stored range of the target domain that the output is to be
    written in; ``None`` keeps the source's own range.
    """

    image: FloatImage
    provenance: Provenance
    target_range: StoredRange | None = field(default=None)


class Method(Protocol):
    """A normalization method. Implementations are callables configured at construction."""

    name: str

    def fingerprint(self) -> str:
        """A stable id of everything that shapes the output (weights, settings)."""
        ...

    def __call__(self, image: FloatImage, info: SourceInfo) -> MethodResult:
        """Normalize one float image in [0, 1] described by ``info``."""
        ...


class Passthrough:
    """Returns the image unchanged. It still runs the full decode -> float -> encode path."""

    name = "passthrough"

    def __init__(self, engine_version: str) -> None:
        self._version = engine_version

    def fingerprint(self) -> str:
        """``passthrough-<engine version>``."""
        return f"passthrough-{self._version}"

    def __call__(self, image: FloatImage, info: SourceInfo) -> MethodResult:
        """A float32 copy of ``image``."""
        return MethodResult(
            image=np.array(image, dtype=np.float32, copy=True),
            provenance=Provenance(method=self.name, engine_version=self._version),
        )
