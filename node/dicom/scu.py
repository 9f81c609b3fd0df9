"""C-STORE / C-ECHO SCU helpers shared by the forwarder and the ``send``/``echo`` commands."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
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


def _syntaxes(ds: Dataset) -> list[str]:
    """The transfer syntaxes to propose for ``ds``: its own, plus the native alternatives."""
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed or not ts.is_little_endian or ts.is_deflated:
        return [ts]  # pynetdicom re-encodes only between the uncompressed little endian syntaxes
    return list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))


def _associate(
    calling: str,
    host: str,
    port: int,
    called: str,
    timeout_s: float,
    contexts: Sequence[tuple[str, list[str]]],
) -> tuple[AE, Association]:
    """Request an association proposing ``contexts`` (established or not)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae, ae.associate(host, port, ae_title=called)


def describe_failure(assoc: Association, where: str) -> str:
    """Why an association to ``where`` is not established: rejected, aborted or no connection."""
    if assoc.is_rejected:
        return f"association to {where} rejected"
    if assoc.is_aborted:
        return f"association to {where} aborted"
    return f"cannot connect to {where}"


def store_datasets(
    items: Sequence[tuple[str, Dataset]],
    host: str,
    port: int,
    *,
    calling: str,
    called: str,
    timeout_s: float = 30.0,
) -> list[StoreOutcome]:
    """Send data sets with C-STORE, over one association per 128 distinct contexts.

    Args:
        items: (label, data set) pairs; the label names the outcome (a path).
        host: the peer's address.
        port: the peer's port.
        calling: our AE title.
        called: the peer's AE title.
        timeout_s: connection, ACSE, DIMSE and network timeout.

    Returns:
        One outcome per item, in order. Never raises for a network or peer failure.
    """
    where = f"{called}@{host}:{port}"
    contexts: dict[tuple[str, tuple[str, ...]], None] = {}
    for _, ds in items:
        contexts[(str(ds.SOPClassUID), tuple(_syntaxes(ds)))] = None
    if len(contexts) > MAX_CONTEXTS:
        half = len(items) // 2
        return store_datasets(
            items[:half], host, port, calling=calling, called=called, timeout_s=timeout_s
        ) + store_datasets(
            items[half:], host, port, calling=calling, called=called, timeout_s=timeout_s
        )
    _, assoc = _associate(
        calling, host, port, called, timeout_s, [(c, list(s)) for c, s in contexts]
    )
    if not assoc.is_established:
        return [StoreOutcome(label, None, describe_failure(assoc, where)) for label, _ in items]
    try:
        return _send_all(assoc, items, called)
    finally:
        if assoc.is_established:
            assoc.release()


def _send_all(
    assoc: Association, items: Sequence[tuple[str, Dataset]], called: str
) -> list[StoreOutcome]:
    """Send each item over an established association until it is lost."""
    outcomes: list[StoreOutcome] = []
    for label, ds in items:
        outcomes.append(_send_one(assoc, label, ds, called))
        if not assoc.is_established:
            outcomes.extend(
                StoreOutcome(lbl, None, "association lost") for lbl, _ in items[len(outcomes) :]
            )
            break
    return outcomes


def _send_one(assoc: Association, label: str, ds: Dataset, called: str) -> StoreOutcome:
    """C-STORE one data set in an accepted presentation context, if there is one."""
    ts = ds.file_meta.TransferSyntaxUID
    if not any(
        cx.abstract_syntax == ds.SOPClassUID and cx.transfer_syntax[0] in _syntaxes(ds)
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
    host: str, port: int, *, calling: str, called: str, timeout_s: float = 30.0
) -> tuple[int | None, str]:
    """C-ECHO a peer.

    Returns:
        (the peer's status, "") or (None, why no status came).
    """
    where = f"{called}@{host}:{port}"
    _, assoc = _associate(
        calling, host, port, called, timeout_s, [(Verification, [ImplicitVRLittleEndian])]
    )
    if not assoc.is_established:
        return None, describe_failure(assoc, where)
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    status = getattr(rsp, "Status", None)
    return (None, "no response") if status is None else (int(status), "")
