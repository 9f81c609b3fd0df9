"""The safety gate: a normalized output is checked against its source before it is sent."""

from __future__ import annotations

from mr2nst.core.intensity import FloatImage
from mr2nst.node.config import SafetySection
from mr2nst.node.errors import SafetyGateError


def check_output(source: FloatImage, output: FloatImage, settings: SafetySection) -> None:
    """Raise :class:`SafetyGateError` when ``output`` is not a safe rendering of ``source``.

    Both are unit-float images (brighter = denser) in the same geometry.
    """
    if not settings.enabled:
        return
    if source.shape != output.shape:
        raise SafetyGateError("safety.shape", f"output {output.shape} != source {source.shape}")
