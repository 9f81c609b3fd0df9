"""Hostile peers over real sockets: slots, deadlines, PDU size (hole 1), truncated data (hole 2)."""

import select
import socket
import struct
import time
from pathlib import Path

import psutil
import pytest
from dicom_factory import make_mg
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from mr2nst.node.config import parse_config
from mr2nst.node.dicom.status import StoreStatus
from mr2nst.node.ledger import Ledger
from mr2nst.node.service import scp
from mr2nst.node.service.routing import Router
from mr2nst.node.service.spool import Spool

ROUTES = {
    "routes": [
        {
            "name": "mg",
            "match": {"Modality": "MG"},
            "method": "passthrough",
            "destinations": ["cad"],
        }
    ],
    "destinations": {"cad": {"ae_title": "CAD", "host": "127.0.0.1", "port": 1}},
}


@pytest.fixture
def node(tmp_path):
    """Starts SCPs on ephemeral ports (node settings as keyword overrides); stops them after."""
    started: list = []

    def start(**node_overrides):
        cfg = parse_config(
            {
                **ROUTES,
                "node": {
                    "host": "127.0.0.1",
                    "data_dir": str(tmp_path / "data"),
                    "min_free_disk_mb": 0,
                    "allowed_callers": ["MODALITY"],
                    "network_timeout_s": 2,
                    **node_overrides,
                },
            },
            environ={},
        )
        spool = Spool(cfg.node.data_dir).create()
        ledger = Ledger.open(cfg.ledger_url)
        service = scp.StoreService(
            spool,
            ledger,
            Router(cfg.routes),
            cfg.node.min_free_disk_mb,
            scp.Allowlist.parse(cfg.node.allowed_callers),
        )
        server = scp.start_scp(cfg, service, port=0)
        started.append((server, ledger))
        n = type("Node", (), {})()
        n.port, n.ledger, n.spool = server.server_address[1], ledger, spool
        return n

    yield start
    for server, ledger in started:
        server.shutdown()
        ledger.close()


def echo(port: int, source: str = "127.0.0.1") -> bool:
    """Whether a C-ECHO from MODALITY (bound to ``source``) succeeds."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MR2NST", bind_address=(source, 0))
    if not assoc.is_established:
        return False
    ok = int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return ok


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Whether the node closes ``sock`` within ``seconds`` (sending ``trickle`` bytewise)."""
    deadline = time.monotonic() + seconds
    pending = bytearray(trickle)
    while time.monotonic() < deadline:
        if pending:
            try:
                sock.send(bytes(pending[:1]))
            except OSError:
                return True
            del pending[:1]
        ready, _, _ = select.select([sock], [], [], 0.5)
        if ready:
            try:
                if not sock.recv(65536):
                    return True
            except OSError:
                return True
    return False


def test_garbage_then_socket_closed_and_caller_served(node):
    """4 KB of garbage gets the socket closed soon; an allow-listed caller still associates."""
    n = node()
    with socket.create_connection(("127.0.0.1", n.port)) as sock:
        sock.sendall(b"\x5a" * 4096)
        assert closed_within(sock, 10)
    assert echo(n.port)


def test_http_get_then_socket_closed(node):
    """An HTTP GET to the DICOM port gets the socket closed soon."""
    n = node()
    with socket.create_connection(("127.0.0.1", n.port)) as sock:
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: node\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"
        )
        assert closed_within(sock, 10)


def test_per_peer_limit_refuses_extra_connection(node):
    """Beyond node.max_associations_per_peer one IP's next connection is closed; others work."""
    n = node(max_associations_per_peer=2, network_timeout_s=20)
    held = [socket.create_connection(("127.0.0.1", n.port)) for _ in range(2)]
    try:
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", n.port)) as extra:
            assert closed_within(extra, 3)
        assert echo(n.port, source="127.0.0.2")
    finally:
        for sock in held:
            sock.close()


def test_trickled_associate_request_is_cut_off(node):
    """An A-ASSOCIATE-RQ sent a byte at a time is cut off near node.network_timeout_s."""
    n = node(network_timeout_s=2)
    with socket.create_connection(("127.0.0.1", n.port)) as sock:
        started = time.monotonic()
        rq = b"\x01\x00" + struct.pack(">L", 68) + b"\x00\x01\x00\x00" + b"MR2NST".ljust(16)
        assert closed_within(sock, 12, trickle=rq + b"\x00" * 48)
        assert time.monotonic() - started < 8


def test_huge_claimed_pdu_is_refused_unbuffered(node):
    """A PDU header claiming ~4 GB is refused without the node buffering what follows."""
    n = node(network_timeout_s=5)
    process = psutil.Process()
    before = process.memory_info().rss
    chunk = b"\x00" * (1 << 20)
    with socket.create_connection(("127.0.0.1", n.port)) as sock:
        sock.settimeout(5)
        sock.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFF0))
        refused = False
        for _ in range(256):  # up to 256 MB
            try:
                sock.sendall(chunk)
            except OSError:
                refused = True
                break
        refused = refused or closed_within(sock, 5)
    assert refused
    assert process.memory_info().rss - before < 100 * 1024 * 1024


# Hole 2: a data set that cannot be understood gets 0xC000 and leaves nothing behind.


def file_bytes(ds, transfer_syntax=ExplicitVRLittleEndian) -> tuple[bytes, int]:
    """``ds`` as a DICOM file's bytes, and where its data set starts (after the file meta)."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    meta_length = struct.unpack("<L", data[140:144])[0]  # (0002,0000) group length value
    return data, 144 + meta_length


def send_file(port: int, path: Path, sop_class: str, transfer_syntax: str) -> int | None:
    """C-STORE the file at ``path`` as encoded (not decoded by the sender); the status."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MR2NST")
    assert assoc.is_established
    rsp = assoc.send_c_store(path)
    assoc.release()
    return int(rsp.Status) if "Status" in rsp else None


def stored_nothing(n) -> bool:
    """Whether the node has neither a spool file nor a ledger row."""
    return n.ledger.counts() == {} and list(n.spool.incoming.iterdir()) == []


def store_bytes(n, tmp_path, data: bytes, ds, transfer_syntax=ExplicitVRLittleEndian):
    """Write ``data`` to a file and C-STORE it; the status."""
    path = tmp_path / "sent.dcm"
    path.write_bytes(data)
    return send_file(n.port, path, ds.SOPClassUID, transfer_syntax)


def test_truncated_at_301_bytes_c000(node, tmp_path):
    """A data set cut at 301 bytes gets 0xC000 and nothing is stored."""
    n = node()
    ds = make_mg()
    data, start = file_bytes(ds)
    assert store_bytes(n, tmp_path, data[: start + 301], ds) == StoreStatus.CANNOT_UNDERSTAND
    assert stored_nothing(n)


def test_element_one_byte_short_c000(node, tmp_path):
    """A data set whose last element is one byte short gets 0xC000 and nothing is stored."""
    n = node()
    ds = make_mg()
    data, _ = file_bytes(ds)
    assert store_bytes(n, tmp_path, data[:-1], ds) == StoreStatus.CANNOT_UNDERSTAND
    assert stored_nothing(n)


def test_native_pixel_data_too_short_c000(node, tmp_path):
    """Native Pixel Data shorter than Rows x Columns x bytes per pixel gets 0xC000."""
    n = node()
    ds = make_mg()
    ds.PixelData = ds.PixelData[:-100]
    data, _ = file_bytes(ds)
    assert store_bytes(n, tmp_path, data, ds) == StoreStatus.CANNOT_UNDERSTAND
    assert stored_nothing(n)


def test_encapsulated_without_fragments_c000(node, tmp_path):
    """Encapsulated Pixel Data with an offset table and no fragment gets 0xC000."""
    n = node()
    ds = make_mg()
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # an empty Basic Offset Table only
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    data, _ = file_bytes(ds, JPEG2000)
    assert store_bytes(n, tmp_path, data, ds, JPEG2000) == StoreStatus.CANNOT_UNDERSTAND
    assert stored_nothing(n)


def test_whole_instance_still_stored(node, tmp_path):
    """A complete instance sent the same way still gets 0x0000 and is stored."""
    n = node()
    ds = make_mg()
    data, _ = file_bytes(ds)
    assert store_bytes(n, tmp_path, data, ds) == StoreStatus.SUCCESS
    assert len(list(n.spool.incoming.iterdir())) == 1
