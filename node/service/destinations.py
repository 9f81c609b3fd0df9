"""Destinations: small classes behind a registry, keyed by ``kind`` in the config.

Only DICOM C-STORE exists now; DICOMweb STOW-RS can register here later.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from mr2nst.node.config import Config
from mr2nst.node.config import Destination as DestinationConfig
from mr2nst.node.dicom.scu import read_file, store_datasets

# C-STORE statuses from a peer that retrying cannot fix (PS3.4 B.2.3, PS3.7 C).
PERMANENT_STATUS_PREFIXES = (
    0xA9,
    0xC0,
    0xC1,
    0xC2,
    0xC3,
    0xC4,
    0xC5,
    0xC6,
    0xC7,
    0xC8,
    0xC9,
    0xCA,
    0xCB,
    0xCC,
    0xCD,
    0xCE,
    0xCF,
)
PERMANENT_STATUSES = frozenset({0x0122, 0x0124})  # SOP class not supported, not authorized
# Success, the C-STORE warnings (B000 coercion, B006 elements discarded, B007 data set does
# not match SOP class), the general DIMSE warnings (0001, 0107 attribute list, 0116 value out
# of range) and 0111 duplicate SOP instance: the peer already holds this very instance
# (output UIDs are deterministic), so it counts as delivered.
SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116, 0x0111})


@dataclass(frozen=True)
class SendResult:
    ok: bool
    status: int | None = None
    permanent: bool = False
    error: str = ""


def classify(status: int) -> SendResult:
    """Map a peer's C-STORE status to an outcome."""
    if status in SUCCESS_STATUSES:
        return SendResult(True, status)
    permanent = status in PERMANENT_STATUSES or (status >> 8) in PERMANENT_STATUS_PREFIXES
    return SendResult(False, status, permanent, f"peer returned status 0x{status:04X}")


class Destination(Protocol):
    name: str

    def send(self, path: str) -> SendResult: ...


class DicomStoreDestination:
    """Sends one file per association with C-STORE SCU (pynetdicom)."""

    def __init__(
        self, name: str, cfg: DestinationConfig, calling_ae: str, timeout_s: float
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s

    def send(self, path: str) -> SendResult:
        try:
            ds = read_file(path)
        except ValueError as exc:
            return SendResult(False, None, True, str(exc))
        [outcome] = store_datasets(
            [(path, ds)],
            self.cfg.host,
            self.cfg.port,
            calling=self.calling_ae,
            called=self.cfg.ae_title,
            timeout_s=self.timeout_s,
        )
        if outcome.status is None:
            # No context for this SOP class / syntax is a configuration matter:
            # retrying cannot help.
            return SendResult(False, None, outcome.no_context, outcome.error)
        return classify(outcome.status)


DestinationFactory = Callable[[str, DestinationConfig, Config], Destination]

REGISTRY: dict[str, DestinationFactory] = {
    "dicom": lambda name, cfg, config: DicomStoreDestination(
        name,
        cfg,
        config.forwarding.calling_ae or config.node.ae_title,
        config.node.network_timeout_s,
    ),
}


def build_destinations(config: Config) -> Mapping[str, Destination]:
    return {
        name: REGISTRY[cfg.kind](name, cfg, config) for name, cfg in config.destinations.items()
    }
