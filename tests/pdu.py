"""Hand-built DICOM Upper Layer PDUs (PS3.8 section 9.3) for protocol-abuse cases.

Only what the hostile suite needs: A-ASSOCIATE-RQ with its items, P-DATA-TF with PDVs,
A-RELEASE-RQ, A-ABORT, a C-STORE-RQ command set, and a reader for the node's answers.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.543.99"

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, 4-byte big-endian length, body."""
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def item(item_type: int, body: bytes) -> bytes:
    """A variable item: type, reserved byte, 2-byte big-endian length, body."""
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def uid_bytes(uid: str) -> bytes:
    return uid.encode("ascii")


def presentation_context(context_id: int, abstract: str, transfers: list[str]) -> bytes:
    """Presentation context item 0x20: id, abstract syntax 0x30, transfer syntaxes 0x40."""
    body = bytes([context_id, 0, 0, 0]) + item(0x30, uid_bytes(abstract))
    body += b"".join(item(0x40, uid_bytes(ts)) for ts in transfers)
    return item(0x20, body)


def user_information(max_pdu: int = 16384) -> bytes:
    """User information item 0x50: maximum length 0x51 and implementation class UID 0x52."""
    return item(
        0x50, item(0x51, struct.pack(">L", max_pdu)) + item(0x52, uid_bytes(IMPLEMENTATION_UID))
    )


def associate_rq(
    contexts: list[tuple[int, str, list[str]]],
    *,
    called: str = "MR2NST",
    calling: str = "MODALITY",
    version: int = 1,
    max_pdu: int = 16384,
    extra_items: bytes = b"",
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2)."""
    body = struct.pack(">HH", version, 0)
    body += called.encode("ascii").ljust(16) + calling.encode("ascii").ljust(16) + bytes(32)
    body += item(0x10, uid_bytes(APPLICATION_CONTEXT))
    body += b"".join(presentation_context(*c) for c in contexts)
    body += extra_items
    body += user_information(max_pdu)
    return pdu(ASSOCIATE_RQ, body)


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF PDU; each PDV is (context id, message control header, fragment)."""
    body = b"".join(
        struct.pack(">LB", len(data) + 2, ctx) + bytes([header]) + data
        for ctx, header, data in pdvs
    )
    return pdu(P_DATA_TF, body)


def release_rq() -> bytes:
    return pdu(RELEASE_RQ, bytes(4))


def abort() -> bytes:
    return pdu(ABORT, bytes(4))


def command_set(ds: Dataset) -> bytes:
    """A command set in implicit VR little endian, with (0000,0000) group length first."""
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, ds)
    raw = body.getvalue()
    return struct.pack("<HHLL", 0, 0, 4, len(raw)) + raw


def c_store_rq(sop_class: str, sop_uid: str, message_id: int = 1, has_data: bool = True) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1)."""
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = 0x0001
    ds.MessageID = message_id
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000 if has_data else 0x0101
    ds.AffectedSOPInstanceUID = sop_uid
    return command_set(ds)


def encode_dataset(ds: Dataset, implicit: bool = False) -> bytes:
    """``ds`` (without file meta) as data set bytes, explicit (default) or implicit VR LE."""
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    return out.getvalue()


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None when the node closes the socket first."""
    deadline = time.monotonic() + timeout

    def recv_exact(n: int) -> bytes | None:
        data = bytearray()
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no PDU within {timeout}s")
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                continue
            try:
                chunk = sock.recv(n - len(data))
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    header = recv_exact(6)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = recv_exact(length)
    if body is None:
        return None
    return pdu_type, body


def accepted_contexts(ac_body: bytes) -> dict[int, int]:
    """From an A-ASSOCIATE-AC body: presentation context id -> result (0 = acceptance)."""
    out: dict[int, int] = {}
    pos = 68
    while pos + 4 <= len(ac_body):
        item_type, _, length = struct.unpack(">BBH", ac_body[pos : pos + 4])
        if item_type == 0x21:
            out[ac_body[pos + 4]] = ac_body[pos + 6]
        pos += 4 + length
    return out


def command_fragments(p_data_body: bytes) -> tuple[bytes, bool]:
    """The command bytes a P-DATA-TF body carries, and whether its last fragment is among them."""
    pos, command, last = 0, b"", False
    while pos + 6 <= len(p_data_body):
        length = struct.unpack(">L", p_data_body[pos : pos + 4])[0]
        header = p_data_body[pos + 5]
        if header & 0x01:
            command += p_data_body[pos + 6 : pos + 4 + length]
            last = last or bool(header & 0x02)
        pos += 4 + length
    return command, last


def command_status(command: bytes) -> int | None:
    """The (0000,0900) Status of a whole command set."""
    ds = read_dataset(BytesIO(command), is_implicit_VR=True, is_little_endian=True)
    return int(ds.Status) if "Status" in ds else None
