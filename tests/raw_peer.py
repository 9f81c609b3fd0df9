"""A raw DICOM peer for hostile tests: pynetdicom from raw bytes, and hand-built PDUs."""

from __future__ import annotations

import itertools
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pdu
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

# The node under test (conftest.py) runs with these settings.
TIMEOUT_S = 3  # node.network_timeout_s: silent or stalled peers are cut off after this
PER_PEER = 3  # node.max_associations_per_peer

# Peak RSS of the node's process tree (serve + its worker) during one case may exceed the
# baseline by at most this much. The baseline is taken after a warm-up MG went through the
# whole path (the worker has imported torch and normalized once): about 790 MB on the
# 2-core development machine. Over the suite the largest growth measured in a passing case
# was 15 MB (a header claiming ~4 GB, an element claiming 200 MB, 20,000 nested sequences,
# a 256 MB stream all included), so 256 MB leaves wide margin for noise while any buffering
# of a claimed or streamed payload crosses it.
RSS_HEADROOM = 256 * 1024 * 1024

MG = DigitalMammographyXRayImageStorageForPresentation
CT = CTImageStorage
EXPLICIT, IMPLICIT = ExplicitVRLittleEndian, ImplicitVRLittleEndian
ABORTED = "aborted"  # what ``send_file`` answers when no C-STORE response came


class Sampler(threading.Thread):
    """Calls ``sample`` every 50 ms until ``halt`` is set, keeping the peak value."""

    def __init__(self, sample: Callable[[], int]) -> None:
        super().__init__(daemon=True)
        self.sample, self.peak, self.halt = sample, 0, threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.peak = max(self.peak, self.sample())
            self.halt.wait(0.05)


def meta_bytes(sop_class: str, sop_uid: str, transfer_syntax: str = EXPLICIT) -> bytes:
    """A DICOM file's preamble, prefix and file meta group (what send_c_store reads first)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.preamble = b"\x00" * 128
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dataset_bytes(ds: Dataset, implicit: bool = False) -> bytes:
    """``ds`` as data set bytes (no file meta), explicit VR LE unless ``implicit``."""
    return pdu.encode_dataset(ds, implicit=implicit)


def send_file(
    port: int,
    path: Path,
    *,
    sop_class: str = MG,
    transfer_syntax: str = EXPLICIT,
    calling: str = "MODALITY",
) -> int | str:
    """C-STORE the file at ``path`` as encoded (pynetdicom sends its bytes as they are).

    Returns the status, or ``ABORTED`` when the association ended without a response.
    """
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class, transfer_syntax)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="MR2NST")
    assert assoc.is_established, "the node refused the association"
    rsp = assoc.send_c_store(path)
    status = int(rsp.Status) if "Status" in rsp else ABORTED
    if assoc.is_established:
        assoc.release()
    return status


def send_bytes(
    port: int,
    data: bytes,
    *,
    sop_class: str = MG,
    sop_uid: str,
    transfer_syntax: str = EXPLICIT,
    calling: str = "MODALITY",
) -> int | str:
    """C-STORE ``data`` (data set bytes, sent exactly as given) over a raw socket.

    pynetdicom's ``send_c_store(path)`` re-encodes what it reads (it fixed a lying element
    length), so the bytes go out through hand-built PDUs instead. Returns the status, or
    ``ABORTED`` when the node closed or aborted without a C-STORE response.
    """
    with associate(port, [(1, sop_class, [transfer_syntax])], calling=calling) as sock:
        send_store(sock, data, sop_class, sop_uid)
        status = store_status(sock)
        if status is None:
            return ABORTED
        sock.sendall(pdu.release_rq())
        answer_of(sock)
        return status


def echo_from(port: int, source: str = "127.0.0.1", calling: str = "MODALITY") -> bool:
    """Whether a C-ECHO from ``calling`` bound to ``source`` succeeds."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MR2NST", bind_address=(source, 0))
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return ok


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the node closes ``sock`` within ``seconds`` (sending ``trickle`` bytewise);
    PDUs the node sends meanwhile (an A-ABORT, say) are read and dropped."""
    deadline = time.monotonic() + seconds
    pending = bytearray(trickle)
    while time.monotonic() < deadline:
        if pending:
            try:
                sock.send(bytes(pending[:1]))
            except OSError:
                return True
            del pending[:1]
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            try:
                if not sock.recv(65536):
                    return True
            except OSError:
                return True
    return False


_SOURCES = itertools.count()


def fresh_source() -> str:
    """A loopback address no earlier connection of this run used.

    A connection the node cut keeps its per-peer slot until its association thread ends
    (about node.network_timeout_s later); giving each connection its own source address
    keeps one case's hostile peer from using up the next case's slots.
    """
    n = next(_SOURCES)
    return f"127.0.{2 + n // 250}.{1 + n % 250}"


def connect(port: int, source: str | None = None) -> socket.socket:
    """A TCP connection to the node from ``source`` (default: a fresh loopback address)."""
    address = (source or fresh_source(), 0)
    sock = socket.create_connection(("127.0.0.1", port), source_address=address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def associate(
    port: int,
    contexts: list[tuple[int, str, list[str]]] | None = None,
    source: str | None = None,
    **kw: object,
) -> socket.socket:
    """A raw socket with an established association (context 1: MG explicit, 3: CT explicit)."""
    sock = connect(port, source)
    contexts = contexts or [(1, MG, [EXPLICIT]), (3, CT, [EXPLICIT])]
    sock.sendall(pdu.associate_rq(contexts, **kw))  # type: ignore[arg-type]
    answer = pdu.read_pdu(sock)
    assert answer is not None and answer[0] == pdu.ASSOCIATE_AC, answer
    assert set(pdu.accepted_contexts(answer[1]).values()) == {0}, "a context was refused"
    return sock


def fragments(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def send_store(
    sock: socket.socket,
    ds_bytes: bytes,
    sop_class: str,
    sop_uid: str,
    context_id: int = 1,
    fragment: int = 16000,
) -> None:
    """Send a whole C-STORE-RQ (command, then the data set in PDVs of ``fragment`` bytes)."""
    sock.sendall(pdu.p_data([(context_id, 0x03, pdu.c_store_rq(sop_class, sop_uid))]))
    parts = fragments(ds_bytes, fragment)
    for i, part in enumerate(parts):
        last = 0x02 if i == len(parts) - 1 else 0x00
        sock.sendall(pdu.p_data([(context_id, last, part)]))


def store_status(sock: socket.socket, timeout: float = 30) -> int | None:
    """The Status of the node's next C-STORE-RSP (however many PDUs carry it), or None if
    the node closed or aborted instead."""
    command = b""
    while True:
        answer = pdu.read_pdu(sock, timeout)
        if answer is None or answer[0] != pdu.P_DATA_TF:
            return None
        part, last = pdu.command_fragments(answer[1])
        command += part
        if last:
            return pdu.command_status(command)


def answer_of(sock: socket.socket, timeout: float = 10) -> int | None:
    """The type of the node's next PDU, or None when it closes the socket without one."""
    answer = pdu.read_pdu(sock, timeout)
    return None if answer is None else answer[0]


def reject_fields(sock: socket.socket, timeout: float = 10) -> tuple[int, int, int] | None:
    """(result, source, reason) of an A-ASSOCIATE-RJ, or None for any other answer."""
    answer = pdu.read_pdu(sock, timeout)
    if answer is None or answer[0] != pdu.ASSOCIATE_RJ:
        return None
    _, result, source, reason = struct.unpack(">BBBB", answer[1][:4])
    return result, source, reason
