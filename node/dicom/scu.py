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
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


@dataclass(frozen=True)
class StoreOutcome:
    path: str
    status: int | None  # None: not sent (see error)
    error: str = ""
    no_context: bool = False  # the peer accepted no presentation context for it


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named directly, and every file below named folders (sorted)."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def _syntaxes(ds: Dataset) -> list[str]:
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
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae, ae.associate(host, port, ae_title=called)


def describe_failure(assoc: Association, where: str) -> str:
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
    """Send datasets over one association (per 128 distinct contexts); one outcome each."""
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
    outcomes: list[StoreOutcome] = []
    try:
        for label, ds in items:
            ts = ds.file_meta.TransferSyntaxUID
            if not any(
                cx.abstract_syntax == ds.SOPClassUID and cx.transfer_syntax[0] in _syntaxes(ds)
                for cx in assoc.accepted_contexts
            ):
                outcomes.append(
                    StoreOutcome(
                        label,
                        None,
                        f"{called} accepts no presentation context for "
                        f"{ds.SOPClassUID} in {ts.name}",
                        True,
                    )
                )
                continue
            try:
                rsp = assoc.send_c_store(ds)
            except (
                ValueError,
                AttributeError,
            ) as exc:  # pynetdicom cannot encode it for the context
                outcomes.append(
                    StoreOutcome(label, None, f"cannot send {ds.SOPClassUID}: {exc}", True)
                )
                continue
            status = getattr(rsp, "Status", None)
            outcomes.append(
                StoreOutcome(
                    label,
                    None if status is None else int(status),
                    "" if status is not None else "no response (timeout or abort)",
                )
            )
            if not assoc.is_established:
                outcomes.extend(
                    StoreOutcome(lbl, None, "association lost") for lbl, _ in items[len(outcomes) :]
                )
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def read_file(path: str | Path) -> Dataset:
    """Read a DICOM file (raises ValueError with a one-line reason)."""
    try:
        return pydicom.dcmread(path)
    except (OSError, InvalidDicomError, EOFError, ValueError, KeyError) as exc:
        raise ValueError(
            f"{path}: not a readable DICOM file ({exc.__class__.__name__}: {exc})"
        ) from exc


def echo(
    host: str, port: int, *, calling: str, called: str, timeout_s: float = 30.0
) -> tuple[int | None, str]:
    """C-ECHO; returns (status or None, error)."""
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
