"""Hostile peers over real sockets: slots, deadlines, PDU size (hole 1), truncated data (hole 2)."""

import socket
import struct
import time

import psutil
import pytest
from dicom_factory import make_mg
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian
from raw_peer import closed_within, echo_from

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
            max_dataset_bytes=cfg.node.max_dataset_mb << 20,
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
    return echo_from(port, source)


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


def stored_nothing(n) -> bool:
    """Whether the node has neither a spool file nor a ledger row."""
    return n.ledger.counts() == {} and list(n.spool.incoming.iterdir()) == []


def store_bytes(n, tmp_path, data: bytes, ds, transfer_syntax=ExplicitVRLittleEndian):
    """C-STORE the data set part of the file bytes ``data`` exactly as given (raw PDUs:
    pynetdicom's ``send_c_store(path)`` would re-encode it); the status."""
    from raw_peer import send_bytes

    start = 144 + struct.unpack("<L", data[140:144])[0]  # after the file meta group
    return send_bytes(
        n.port,
        data[start:],
        sop_class=str(ds.SOPClassUID),
        sop_uid=str(ds.SOPInstanceUID),
        transfer_syntax=transfer_syntax,
    )


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


# Found by the hostile suite (tests/hostile): data sets that were acknowledged and then
# could not be delivered, and a deflate bomb. Sent as raw PDUs (exactly these bytes).


def raw_mg():
    """A small MG and its explicit VR little endian data set bytes (no file meta)."""
    from raw_peer import dataset_bytes

    ds = make_mg(rows=32, cols=24)
    del ds.file_meta
    return ds, dataset_bytes(ds)


def send_raw(n, data: bytes, ds, **kw):
    from raw_peer import send_bytes

    return send_bytes(n.port, data, sop_uid=str(ds.SOPInstanceUID), **kw)


def test_implicit_bytes_on_explicit_context_c000(node):
    """Implicit VR bytes on an Explicit VR context: 0xC000, nothing stored."""
    from raw_peer import dataset_bytes

    n = node()
    ds, _ = raw_mg()
    assert send_raw(n, dataset_bytes(ds, implicit=True), ds) == StoreStatus.CANNOT_UNDERSTAND
    assert stored_nothing(n)


def test_explicit_bytes_on_implicit_context_c000(node):
    """Explicit VR bytes on an Implicit VR context: 0xC000, nothing stored."""
    from pydicom.uid import ImplicitVRLittleEndian

    n = node()
    ds, data = raw_mg()
    status = send_raw(n, data, ds, transfer_syntax=ImplicitVRLittleEndian)
    assert status == StoreStatus.CANNOT_UNDERSTAND
    assert stored_nothing(n)


def test_undefined_length_pixel_data_on_native_syntax_c000(node):
    """Pixel Data of undefined length (items) on Explicit VR Little Endian: 0xC000."""
    from raw_peer import dataset_bytes

    n = node()
    ds, _ = raw_mg()
    frame = bytes(ds.PixelData)
    del ds.PixelData
    items = b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\x00\xe0" + struct.pack("<L", len(frame))
    items += frame + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    pixel = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + items
    assert send_raw(n, dataset_bytes(ds) + pixel, ds) == StoreStatus.CANNOT_UNDERSTAND
    assert stored_nothing(n)


def test_odd_length_value_c000(node):
    """A value of odd length (PS3.5 7.1.1): 0xC000, nothing stored."""
    n = node()
    ds, data = raw_mg()
    lo = struct.pack("<HH", 0x0010, 0x0020) + b"LO"
    even = lo + struct.pack("<H", len(ds.PatientID) + 1) + ds.PatientID.encode() + b" "
    assert data.count(even) == 1
    odd = data.replace(even, lo + struct.pack("<H", len(ds.PatientID)) + ds.PatientID.encode())
    assert send_raw(n, odd, ds) == StoreStatus.CANNOT_UNDERSTAND
    assert stored_nothing(n)


def test_deflate_bomb_refused_a700_without_inflating(node):
    """0.1 MB that inflates past node.max_dataset_mb: 0xA700, counted without being kept."""
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    n = node(max_dataset_mb=16)
    ds, data = raw_mg()
    bomb = data + struct.pack("<HH2sHL", 0x7FE1, 0x1001, b"OB", 0, 100_000_000)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflate.compress(bomb)
    for _ in range(100):
        body += deflate.compress(b"\0" * 1_000_000)
    body += deflate.flush()
    assert len(body) < 200_000
    before = psutil.Process().memory_info().rss
    status = send_raw(n, body, ds, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert status == StoreStatus.OUT_OF_RESOURCES
    assert psutil.Process().memory_info().rss - before < 64 * 1024 * 1024
    assert stored_nothing(n)


def test_data_set_over_max_dataset_mb_refused_a700(node):
    """A plain data set larger than node.max_dataset_mb: 0xA700, nothing stored."""
    n = node(max_dataset_mb=1)
    ds, data = raw_mg()
    filler = struct.pack("<HH2sHL", 0x7FE1, 0x1001, b"OB", 0, 2_000_000) + b"\0" * 2_000_000
    status = send_raw(n, data + filler, ds)
    assert status == StoreStatus.OUT_OF_RESOURCES
    assert stored_nothing(n)
