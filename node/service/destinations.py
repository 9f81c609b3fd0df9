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
from mr2nst.node.dicom.status import Response, classify_store_response, format_status


@dataclass(frozen=True)
class SendResult:
    """The outcome of one attempt to deliver one file.

    Attributes:
        ok: the peer holds the instance (success or warning status).
        status: the peer's C-STORE status; None when none came (see ``error``).
        permanent: retrying cannot help; the delivery becomes ``dead``.
        error: why it failed; empty when ``ok``.
    """

    ok: bool
    status: int | None = None
    permanent: bool = False
    error: str = ""


def classify(status: int) -> SendResult:
    """Map a peer's C-STORE status to a send outcome.

    The classification is :func:`mr2nst.node.dicom.status.classify_store_response`, shared
    with ``mr2nst send``.
    """
    response = classify_store_response(status)
    if response.delivered:
        return SendResult(True, status)
    return SendResult(
        False,
        status,
        response is Response.PERMANENT_FAILURE,
        f"peer returned status {format_status(status)}",
    )


class Destination(Protocol):
    """Where deliveries go: anything with a name that can send one file."""

    name: str

    def send(self, path: str) -> SendResult:
        """Deliver the DICOM file at ``path`` once; never raises for a peer's refusal."""
        ...


class DicomStoreDestination:
    """Sends one file per association with C-STORE SCU (pynetdicom).

    Args:
        name: the destination's name in the config.
        cfg: its ``[destinations.NAME]`` section.
        calling_ae: the AE title this node calls with.
        timeout_s: connection, ACSE and DIMSE timeout.
    """

    def __init__(
        self, name: str, cfg: DestinationConfig, calling_ae: str, timeout_s: float
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s

    def send(self, path: str) -> SendResult:
        """C-STORE the file at ``path``; an unreadable file is a permanent failure."""
        try:
            ds = read_file(path)
        except ValueError as exc:
            return SendResult(False, None, True, str(exc))
        assert self.cfg.port is not None and self.cfg.ae_title is not None  # kind "dicom"
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
    """One destination per ``[destinations.NAME]``, built by the factory of its ``kind``."""
    return {
        name: REGISTRY[cfg.kind](name, cfg, config) for name, cfg in config.destinations.items()
    }
