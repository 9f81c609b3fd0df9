"""Destinations: small classes behind a registry, keyed by ``kind`` in the config.

- ``dicom``: C-STORE SCU (pynetdicom), :class:`DicomStoreDestination` here.
- ``stow``: DICOMweb STOW-RS (dicomweb-client), :class:`~mr2nst.node.service.stow.StowDestination`.

Each destination applies its own settings: the calling AE title, the connection and
response timeouts, at most ``max_associations`` sends at once (a semaphore inside the
object, whatever ``forwarding.concurrency`` is) and the outgoing transfer syntax
(:mod:`mr2nst.node.dicom.transcode`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from pydicom.dataset import Dataset

from mr2nst.node.config import Config
from mr2nst.node.config import Destination as DestinationConfig
from mr2nst.node.dicom.scu import read_file, store_datasets
from mr2nst.node.dicom.status import Response, classify_store_response, format_status
from mr2nst.node.dicom.transcode import transcode
from mr2nst.node.service.tls import client_tls_args


@dataclass(frozen=True)
class SendResult:
    """The outcome of one attempt to deliver one file.

    Attributes:
        ok: the peer holds the instance (success or warning status).
        status: the peer's C-STORE status (for STOW-RS: the instance's DICOM failure or
            warning reason, 0x0000 on success); None when none came (see ``error``).
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
    with ``mr2nst send`` and the STOW-RS destination.
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


@dataclass(frozen=True)
class Timeouts:
    """A destination's timeouts, in seconds.

    Attributes:
        connect_s: to open the TCP connection.
        response_s: for each response (ACSE, DIMSE, HTTP) and network read.
    """

    connect_s: float
    response_s: float

    @classmethod
    def of(cls, cfg: DestinationConfig, config: Config) -> Timeouts:
        """The destination's own timeouts; 0 means ``node.network_timeout_s``."""
        default = config.node.network_timeout_s
        return cls(cfg.connect_timeout_s or default, cfg.timeout_s or default)


class AssociationLimit:
    """At most ``limit`` sends to one destination at once (0: no limit of its own).

    The forwarder's threads wait here; each send is bounded by the destination's timeouts.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit) if limit > 0 else None

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the destination's slots for the duration of the block."""
        if self._slots is None:
            yield
        else:
            with self._slots:
                yield


def read_for_sending(path: str, transfer_syntax: str) -> Dataset | SendResult:
    """Read the file at ``path`` and transcode it as the destination asks.

    Returns:
        The data set to send, or a permanent failure saying why it cannot be sent: the
        file is not readable DICOM, or it cannot be transcoded.
    """
    try:
        ds = read_file(path)
    except ValueError as exc:
        return SendResult(False, None, True, str(exc))
    try:
        return transcode(ds, transfer_syntax)
    except ValueError as exc:
        return SendResult(False, None, True, f"transfer_syntax {transfer_syntax}: {exc}")


class DicomStoreDestination:
    """Sends one file per association with C-STORE SCU (pynetdicom).

    Args:
        name: the destination's name in the config.
        cfg: its ``[destinations.NAME]`` section.
        calling_ae: the AE title this node calls with.
        timeouts: connection and response timeouts.
    """

    def __init__(
        self, name: str, cfg: DestinationConfig, calling_ae: str, timeouts: Timeouts
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.calling_ae = calling_ae
        self.timeouts = timeouts
        self.limit = AssociationLimit(cfg.max_associations)
        # Built once: TLS settings and files were checked at config load.
        self.tls_args = client_tls_args(cfg)

    @classmethod
    def from_config(
        cls, name: str, cfg: DestinationConfig, config: Config
    ) -> DicomStoreDestination:
        """Build it from the config: the calling AE title is the destination's ``calling_ae``,
        else ``forwarding.calling_ae``, else ``node.ae_title``."""
        calling = cfg.calling_ae or config.forwarding.calling_ae or config.node.ae_title
        return cls(name, cfg, calling, Timeouts.of(cfg, config))

    def send(self, path: str) -> SendResult:
        """C-STORE the file at ``path`` in the configured transfer syntax.

        A file that is not readable DICOM, or that cannot be transcoded, is a permanent
        failure; so is a peer that accepts no presentation context for it.
        """
        ds = read_for_sending(path, self.cfg.transfer_syntax)
        if isinstance(ds, SendResult):
            return ds
        assert self.cfg.port is not None and self.cfg.ae_title is not None  # kind "dicom"
        with self.limit.slot():
            [outcome] = store_datasets(
                [(path, ds)],
                self.cfg.host,
                self.cfg.port,
                calling=self.calling_ae,
                called=self.cfg.ae_title,
                timeout_s=self.timeouts.response_s,
                connect_timeout_s=self.timeouts.connect_s,
                exact_syntax=self.cfg.transfer_syntax != "as-received",
                tls_args=self.tls_args,
            )
        if outcome.status is None:
            # No context for this SOP class / syntax is a configuration matter:
            # retrying cannot help.
            return SendResult(False, None, outcome.no_context, outcome.error)
        return classify(outcome.status)


DestinationFactory = Callable[[str, DestinationConfig, Config], Destination]


def _stow(name: str, cfg: DestinationConfig, config: Config) -> Destination:
    # Imported here: the STOW-RS module builds on SendResult and read_for_sending above.
    from mr2nst.node.service.stow import StowDestination

    return StowDestination.from_config(name, cfg, config)


REGISTRY: dict[str, DestinationFactory] = {
    "dicom": DicomStoreDestination.from_config,
    "stow": _stow,
}


def build_destinations(config: Config) -> Mapping[str, Destination]:
    """One destination per ``[destinations.NAME]``, built by the factory of its ``kind``."""
    return {
        name: REGISTRY[cfg.kind](name, cfg, config) for name, cfg in config.destinations.items()
    }
