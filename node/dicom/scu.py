"""C-STORE / C-ECHO SCU helpers shared by the forwarder and the ``send``/``echo`` commands."""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


@dataclass(frozen=True)
class StoreOutcome:
    """What became of one data set sent with C-STORE.

    Attributes:
        path: the item's label (its file).
        status: the peer's C-STORE status; None when it was not sent or no response came.
        error: why there is no status.
        no_context: the peer accepted no presentation context for it (or it cannot be
            encoded in one): a configuration matter that retrying cannot fix.
    """

    path: str
    status: int | None
    error: str = ""
    no_context: bool = False


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named directly, and every file below named folders (sorted)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _syntaxes(ds: Dataset, exact: bool = False) -> list[str]:
    """The transfer syntaxes to propose for ``ds``: its own, plus the native alternatives.

    With ``exact`` (a destination that transcodes), only its own: the configured syntax.
    """
    ts = ds.file_meta.TransferSyntaxUID
    if exact or ts.is_compressed or not ts.is_little_endian or ts.is_deflated:
        return [ts]  # pynetdicom re-encodes only between the uncompressed little endian syntaxes
    return list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))


#: pynetdicom logs the socket error of a failed TCP connection, and keeps it nowhere else.
_TRANSPORT_LOGGER = "pynetdicom.transport"
_TCP_ERROR = "TCP Initialisation Error:"
_ERRNO = re.compile(r"^\[Errno -?\d+\]\s*")


class _ConnectErrors(logging.Filter):
    """Keeps the TCP error pynetdicom logs, by the thread that logged it (it lets all pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_thread: dict[int | None, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_TCP_ERROR):
            self.by_thread[record.thread] = message[len(_TCP_ERROR) :].strip()
        return True


class _AssociationWatch:
    """What happened while an association was requested, from pynetdicom's events.

    Attributes:
        connected: the TCP connection opened.
        accepted: the peer accepted the association (perhaps with no usable context).
        answer: the first answer to the request: the peer's A-ASSOCIATE response or A-ABORT,
            or an A-P-ABORT (the connection closed, or the peer sent no valid DICOM PDU).
        socket_error: the connection error pynetdicom logged (e.g. "Connection refused").
    """

    def __init__(self) -> None:
        self.connected = False
        self.accepted = False
        self.answer: A_ASSOCIATE | A_ABORT | A_P_ABORT | None = None
        self.socket_error = ""

    def handlers(self) -> list[tuple[evt.EventType, object]]:
        """pynetdicom ``evt_handlers`` that fill this watch."""
        return [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_ACSE_RECV, self._received),
        ]

    def _opened(self, event: Event) -> None:
        self.connected = True

    def _accepted(self, event: Event) -> None:
        self.accepted = True

    def _received(self, event: Event) -> None:
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_ASSOCIATE | A_ABORT | A_P_ABORT) and self.answer is None:
            self.answer = primitive


def _associate(
    calling: str,
    host: str,
    port: int,
    called: str,
    timeouts: tuple[float, float],
    contexts: Sequence[tuple[str, list[str]]],
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> tuple[Association | None, _AssociationWatch]:
    """Request an association proposing ``contexts`` (established or not; None when the
    host name cannot be resolved, with the reason in the watch).

    Args:
        timeouts: (seconds to wait for the TCP connection, for each ACSE/DIMSE response
            and network read).
    """
    connect_s, timeout_s = timeouts
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = connect_s
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    watch = _AssociationWatch()
    errors = _ConnectErrors()
    transport_log = logging.getLogger(_TRANSPORT_LOGGER)
    transport_log.addFilter(errors)
    try:
        assoc = ae.associate(
            host,
            port,
            ae_title=called,
            evt_handlers=watch.handlers(),  # type: ignore[arg-type]  # pynetdicom's alias
            tls_args=tls_args,
        )
    except OSError as exc:  # pynetdicom resolves the host name before it connects
        watch.socket_error = f"cannot resolve host {host!r} ({exc.strerror or exc})"
        return None, watch
    finally:
        transport_log.removeFilter(errors)
    watch.socket_error = errors.by_thread.get(assoc.dul.ident, "")
    return assoc, watch


def _connect_error(raw: str, connect_s: float) -> str:
    """A socket error as pynetdicom logs it, said plainly: 'connection refused'."""
    if raw.startswith("cannot resolve"):
        return raw
    text = _ERRNO.sub("", raw).strip()
    if not text:
        return "no TCP connection"
    if text.lower() in ("timed out", "connection timed out"):
        return f"connection timed out after {connect_s:g}s"
    return text[0].lower() + text[1:]


def describe_failure(
    assoc: Association | None, where: str, watch: _AssociationWatch, timeouts: tuple[float, float]
) -> tuple[str, bool]:
    """Why an association to ``where`` is not established, and whether it is a configuration
    matter that retrying cannot fix (the peer accepted none of the proposed contexts).

    The cases: no TCP connection (refused, timed out, unresolvable), rejected (with the
    peer's reason), accepted without a usable presentation context, aborted by the peer,
    no answer within the timeout, or the connection closed without a valid answer.
    """
    connect_s, timeout_s = timeouts
    answer = watch.answer
    if assoc is not None and assoc.is_rejected:
        if isinstance(answer, A_ASSOCIATE) and answer.result in (0x01, 0x02):
            return (
                f"association to {where} rejected "
                f"({answer.result_str.lower()}: {answer.reason_str})",
                False,
            )
        return f"association to {where} rejected", False
    if not watch.connected:
        return f"cannot connect to {where}: {_connect_error(watch.socket_error, connect_s)}", False
    if watch.accepted:
        return f"{where} accepted none of the proposed presentation contexts", True
    if isinstance(answer, A_ABORT):
        return f"association to {where} aborted by the peer", False
    if answer is None:
        return f"no answer from {where} to the association request within {timeout_s:g}s", False
    return (
        f"association to {where} aborted: the connection closed, or the peer sent no valid "
        "DICOM answer",
        False,
    )


def store_datasets(
    items: Sequence[tuple[str, Dataset]],
    host: str,
    port: int,
    *,
    calling: str,
    called: str,
    timeout_s: float = 30.0,
    connect_timeout_s: float | None = None,
    exact_syntax: bool = False,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> list[StoreOutcome]:
    """Send data sets with C-STORE, over one association per 128 distinct contexts.

    Args:
        items: (label, data set) pairs; the label names the outcome (a path).
        host: the peer's address.
        port: the peer's port.
        calling: our AE title.
        called: the peer's AE title.
        timeout_s: ACSE, DIMSE and network timeout.
        connect_timeout_s: TCP connection timeout (None: ``timeout_s``).
        exact_syntax: propose only each data set's own transfer syntax (a destination
            that transcodes sends exactly the syntax it is configured with).
        tls_args: (SSL context, host name to verify) to speak TLS; None: plaintext.

    Returns:
        One outcome per item, in order. Never raises for a network or peer failure.
    """
    where = f"{called}@{host}:{port}"
    timeouts = (timeout_s if connect_timeout_s is None else connect_timeout_s, timeout_s)
    contexts: dict[tuple[str, tuple[str, ...]], None] = {}
    for _, ds in items:
        contexts[(str(ds.SOPClassUID), tuple(_syntaxes(ds, exact_syntax)))] = None
    if len(contexts) > MAX_CONTEXTS:
        half = len(items) // 2
        return [
            outcome
            for part in (items[:half], items[half:])
            for outcome in store_datasets(
                part,
                host,
                port,
                calling=calling,
                called=called,
                timeout_s=timeout_s,
                connect_timeout_s=connect_timeout_s,
                exact_syntax=exact_syntax,
                tls_args=tls_args,
            )
        ]
    assoc, watch = _associate(
        calling, host, port, called, timeouts, [(c, list(s)) for c, s in contexts], tls_args
    )
    if assoc is None or not assoc.is_established:
        why, no_context = describe_failure(assoc, where, watch, timeouts)
        return [StoreOutcome(label, None, why, no_context) for label, _ in items]
    try:
        return _send_all(assoc, items, called, exact_syntax)
    finally:
        if assoc.is_established:
            assoc.release()


def _send_all(
    assoc: Association, items: Sequence[tuple[str, Dataset]], called: str, exact: bool
) -> list[StoreOutcome]:
    """Send each item over an established association until it is lost."""
    outcomes: list[StoreOutcome] = []
    for label, ds in items:
        outcomes.append(_send_one(assoc, label, ds, called, exact))
        if not assoc.is_established:
            outcomes.extend(
                StoreOutcome(lbl, None, "association lost") for lbl, _ in items[len(outcomes) :]
            )
            break
    return outcomes


def _send_one(
    assoc: Association, label: str, ds: Dataset, called: str, exact: bool
) -> StoreOutcome:
    """C-STORE one data set in an accepted presentation context, if there is one."""
    ts = ds.file_meta.TransferSyntaxUID
    if not any(
        cx.abstract_syntax == ds.SOPClassUID and cx.transfer_syntax[0] in _syntaxes(ds, exact)
        for cx in assoc.accepted_contexts
    ):
        return StoreOutcome(
            label,
            None,
            f"{called} accepts no presentation context for {ds.SOPClassUID} in {ts.name}",
            True,
        )
    try:
        rsp = assoc.send_c_store(ds)
    except (ValueError, AttributeError) as exc:  # pynetdicom cannot encode it for the context
        return StoreOutcome(label, None, f"cannot send {ds.SOPClassUID}: {exc}", True)
    status = getattr(rsp, "Status", None)
    if status is None:
        return StoreOutcome(label, None, "no response (timeout or abort)")
    return StoreOutcome(label, int(status))


def read_file(path: str | Path) -> Dataset:
    """Read a DICOM file.

    Raises:
        ValueError: the file is missing or not readable DICOM (a one-line reason).
    """
    try:
        return pydicom.dcmread(path)
    except (OSError, InvalidDicomError, EOFError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{path}: not a readable DICOM file ({exc.__class__.__name__}: {exc})"
        ) from exc


def echo(
    host: str,
    port: int,
    *,
    calling: str,
    called: str,
    timeout_s: float = 30.0,
    connect_timeout_s: float | None = None,
) -> tuple[int | None, str]:
    """C-ECHO a peer.

    Returns:
        (the peer's status, "") or (None, why no status came).
    """
    where = f"{called}@{host}:{port}"
    timeouts = (timeout_s if connect_timeout_s is None else connect_timeout_s, timeout_s)
    assoc, watch = _associate(
        calling, host, port, called, timeouts, [(Verification, [ImplicitVRLittleEndian])]
    )
    if assoc is None or not assoc.is_established:
        return None, describe_failure(assoc, where, watch, timeouts)[0]
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    status = getattr(rsp, "Status", None)
    return (None, "no response") if status is None else (int(status), "")
