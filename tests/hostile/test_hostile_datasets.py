"""Hostile suite, malformed data sets: raw bytes C-STOREd with pynetdicom over real sockets.

Each case asserts the exact status; the ``guard`` fixture (conftest.py) then checks that the
node is up and answers C-ECHO, that its memory stayed bounded, that what was acknowledged
reached the sink and that what was refused did not.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from dicom_factory import make_mg
from peers import wait_for, write_ct
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000, ExplicitVRBigEndian, ImplicitVRLittleEndian, generate_uid
from pydicom.uid import DeflatedExplicitVRLittleEndian as DEFLATED
from raw_peer import CT, EXPLICIT, RSS_HEADROOM, Sampler, dataset_bytes, send_bytes

from mr2nst.node.dicom.status import StoreStatus

pytestmark = pytest.mark.e2e  # like tests/e2e: real peers, run by `make test`

C000 = StoreStatus.CANNOT_UNDERSTAND
A900 = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
OK = StoreStatus.SUCCESS


def mg(**kw) -> Dataset:
    """A small MG instance (file meta is added by ``send_bytes``)."""
    ds = make_mg(rows=32, cols=24, **kw)
    if hasattr(ds, "file_meta"):
        del ds.file_meta
    return ds


def explicit_element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None):
    """An explicit VR little endian element; ``length`` may lie about the value's size."""
    length = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OF", b"OD", b"OL", b"OV"):
        return struct.pack("<HH2sHL", group, elem, vr, 0, length) + value
    return struct.pack("<HH2sH", group, elem, vr, length) + value


def store(hostile, data: bytes, uid: str, **kw) -> int | str:
    """Send ``data`` as ``uid``; record it as acknowledged or refused by the status."""
    status = send_bytes(hostile.port, data, sop_uid=uid, **kw)
    hostile.record(uid, status if isinstance(status, int) else None)
    return status


def sink_copy(hostile, uid: str) -> Dataset:
    """The sink's (first) copy of ``uid``, once it arrived."""
    paths = wait_for(lambda: hostile.received().get(uid), 60, f"{uid} at the sink")
    return pydicom.dcmread(paths[0])


# --- cannot be understood: 0xC000, nothing kept --------------------------------------


def truncated_301(ds: Dataset) -> bytes:
    return dataset_bytes(ds)[:301]


def last_element_short(ds: Dataset) -> bytes:
    return dataset_bytes(ds)[:-1]


def pixels_too_short(ds: Dataset) -> bytes:
    ds.PixelData = ds.PixelData[:-100]
    return dataset_bytes(ds)


def encapsulated_no_fragments(ds: Dataset) -> bytes:
    del ds.PixelData
    item = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # an empty Basic Offset Table, then nothing
    seq_end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return dataset_bytes(ds) + explicit_element(0x7FE0, 0x0010, b"OB", item + seq_end, 0xFFFFFFFF)


def huge_rows_columns(ds: Dataset) -> bytes:
    ds.Rows, ds.Columns = 65535, 65535
    return dataset_bytes(ds)


def claims_200_mb(ds: Dataset) -> bytes:
    private = explicit_element(0x7FE1, 0x0010, b"LO", b"HOSTILE ")
    lie = explicit_element(0x7FE1, 0x1001, b"OB", b"\x00" * 100, 200_000_000)
    return dataset_bytes(ds) + private + lie


def deep_sequence(ds: Dataset, depth: int = 20_000) -> bytes:
    del ds.PixelData
    head = dataset_bytes(ds)
    start = struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
    item_start = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    seq_end = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return head + (start + item_start) * depth + (item_end + seq_end) * depth


def sequence_without_delimiter(ds: Dataset) -> bytes:
    private = explicit_element(0x7FE1, 0x0010, b"LO", b"HOSTILE ")
    start = struct.pack("<HH2sHL", 0x7FE1, 0x1001, b"SQ", 0, 0xFFFFFFFF)
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + explicit_element(0x0008, 0x0100, b"SH", b"CODE")
    return dataset_bytes(ds) + private + start + item


def empty(ds: Dataset) -> bytes:
    return b""


def garbage(ds: Dataset) -> bytes:
    return random.Random(13).randbytes(4000)


def no_sop_instance_uid(ds: Dataset) -> bytes:
    del ds.SOPInstanceUID
    return dataset_bytes(ds)


@pytest.mark.parametrize(
    "build",
    [
        truncated_301,
        last_element_short,
        pixels_too_short,
        encapsulated_no_fragments,
        huge_rows_columns,
        claims_200_mb,
        deep_sequence,
        sequence_without_delimiter,
        empty,
        garbage,
        no_sop_instance_uid,
    ],
)
def test_malformed_data_set_is_refused_c000(hostile, build):
    """A data set that cannot be read whole (truncated, lying lengths, absurd nesting,
    garbage, no SOP Instance UID) gets 0xC000, and nothing of it reaches the sink."""
    ds = mg()
    uid = str(ds.SOPInstanceUID)
    syntax = JPEG2000 if build is encapsulated_no_fragments else EXPLICIT
    assert store(hostile, build(ds), uid, transfer_syntax=syntax) == C000


def test_sop_class_not_matching_context_a900(hostile):
    """A CT data set on an MG presentation context gets 0xA900."""
    ds = mg()
    ds.SOPClassUID = CT
    assert store(hostile, dataset_bytes(ds), str(ds.SOPInstanceUID)) == A900


def test_sop_instance_uid_not_matching_request_a900(hostile):
    """A data set whose SOP Instance UID differs from the request's gets 0xA900."""
    ds = mg()
    other = generate_uid()
    assert store(hostile, dataset_bytes(ds), other) == A900
    hostile.refuse(str(ds.SOPInstanceUID))


@pytest.mark.parametrize("uid", ["../../x", "/abs/x"])
def test_path_like_sop_instance_uid_stays_inside_data_dir(hostile, uid):
    """A SOP Instance UID shaped like a path is acknowledged (the node names its files
    itself) and delivered, and no file named after it appears outside the data directory,
    neither while it is received nor while it is normalized and forwarded."""
    ds = mg(sop_uid=uid)
    before = {p for p in hostile.workdir.parent.rglob("*") if p.name == "x"}
    assert store(hostile, dataset_bytes(ds), uid) == OK
    sink_copy(hostile, uid)  # delivered: the node is done with it
    after = {p for p in hostile.workdir.parent.rglob("*") if p.name == "x"}
    assert after == before
    assert not Path("/abs/x").exists()


# --- text in other character sets: acknowledged, bytes kept --------------------------


PN_TAG = struct.pack("<HH", 0x0010, 0x0010) + b"PN"


def with_patient_name(ds: Dataset, charset: str, name: bytes) -> bytes:
    """``ds`` encoded with (0008,0005) ``charset`` and PatientName set to raw ``name``."""
    ds.SpecificCharacterSet = charset
    ds.PatientName = "Doe^Jane"
    data = dataset_bytes(ds)
    old = PN_TAG + struct.pack("<H", 8) + b"Doe^Jane"
    assert data.count(old) == 1
    name = name + b" " * (len(name) % 2)
    return data.replace(old, PN_TAG + struct.pack("<H", len(name)) + name)


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        ("ISO_IR 192", b"Caf\xc3\x28^Inv\xe9lide"),  # not UTF-8
        ("\\ISO 2022 IR 87", b"Yamada^\x1b$B;3ED\x1b(B=\x1b$B;3\xff"),  # JIS cut short
        ("ISO_IR 999", b"M\xfcller^J\xf6rg"),  # a character set nobody defines
    ],
    ids=["utf8-invalid", "iso2022-jp-broken", "unknown-charset"],
)
def test_undecodable_text_is_acknowledged_and_delivered_byte_exact(hostile, charset, name):
    """Text that cannot be decoded is not the node's business: the instance is acknowledged,
    and the original reaches the sink with PatientName's bytes unchanged."""
    ds = mg()
    uid = str(ds.SOPInstanceUID)
    assert store(hostile, with_patient_name(ds, charset, name), uid) == OK
    copy = sink_copy(hostile, uid)
    padded = name + b" " * (len(name) % 2)
    assert copy.get_item(0x00100010).value == padded


# --- odd but readable: acknowledged, delivered ---------------------------------------


def test_pixel_data_longer_than_expected_is_acknowledged(hostile):
    """Native Pixel Data longer than Rows x Columns needs is readable: 0x0000 and delivered."""
    ds = mg()
    ds.PixelData = ds.PixelData + b"\x00" * 64
    assert store(hostile, dataset_bytes(ds), str(ds.SOPInstanceUID)) == OK


def test_jpeg2000_garbage_fragment_is_delivered_as_is(hostile):
    """JPEG 2000 Pixel Data whose one fragment is garbage is acknowledged (the pixels are not
    the SCP's business) and the original reaches the sink with those bytes unchanged."""
    ds = mg()
    del ds.PixelData
    fragment = b"\xde\xad\xbe\xef" * 32
    pixel = (
        b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
        + b"\xfe\xff\x00\xe0"
        + struct.pack("<L", len(fragment))
        + fragment
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    data = dataset_bytes(ds) + explicit_element(0x7FE0, 0x0010, b"OB", pixel, 0xFFFFFFFF)
    uid = str(ds.SOPInstanceUID)
    assert store(hostile, data, uid, transfer_syntax=JPEG2000) == OK
    copy = sink_copy(hostile, uid)
    assert fragment in copy.PixelData


def test_implicit_vr_bytes_on_explicit_context_c000(hostile):
    """Implicit VR bytes on an Explicit VR context get 0xC000. (They were acknowledged: the
    file kept said explicit, held implicit, and its forward could not be re-encoded.)"""
    ds = mg()
    uid = str(ds.SOPInstanceUID)
    assert store(hostile, dataset_bytes(ds, implicit=True), uid) == C000


def test_undefined_length_pixel_data_on_native_syntax_c000(hostile):
    """Encapsulated-style Pixel Data (undefined length) on Explicit VR Little Endian, which
    PS3.5 A.4 forbids, gets 0xC000. (It was acknowledged, and DCMTK refused every forward.)"""
    ds = mg()
    frame = bytes(ds.PixelData)
    del ds.PixelData
    items = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0"
    items += struct.pack("<L", len(frame)) + frame + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    data = dataset_bytes(ds) + explicit_element(0x7FE0, 0x0010, b"OB", items, 0xFFFFFFFF)
    uid = str(ds.SOPInstanceUID)
    assert store(hostile, data, uid) == C000


def test_odd_length_value_c000(hostile):
    """A PatientID of odd length (9 bytes; PS3.5 7.1.1 wants even) gets 0xC000. (It was
    acknowledged, and DCMTK aborted every forward of it.)"""
    ds = mg()
    data = dataset_bytes(ds)
    lo = struct.pack("<HH", 0x0010, 0x0020) + b"LO"
    even = lo + struct.pack("<H", 10) + b"PID-12345 "
    assert data.count(even) == 1
    data = data.replace(even, lo + struct.pack("<H", 9) + b"PID-12345")
    assert store(hostile, data, str(ds.SOPInstanceUID)) == C000


def test_unknown_vr_is_refused_c000(hostile):
    """An explicit VR element with a VR that does not exist ('ZZ') gets 0xC000."""
    ds = mg()
    del ds.PixelData
    data = dataset_bytes(ds) + struct.pack("<HH2sH", 0x0009, 0x0010, b"ZZ", 4) + b"abcd"
    uid = str(ds.SOPInstanceUID)
    assert store(hostile, data, uid) == C000


def test_little_endian_bytes_on_big_endian_context_c000(hostile):
    """Little endian bytes on an Explicit VR Big Endian context cannot be read: 0xC000."""
    ds = mg()
    uid = str(ds.SOPInstanceUID)
    assert store(hostile, dataset_bytes(ds), uid, transfer_syntax=ExplicitVRBigEndian) == C000


def out_of_order(data: bytes) -> bytes:
    return explicit_element(0x0010, 0x0020, b"LO", b"OUTORDER") + data


def duplicate_element(data: bytes) -> bytes:
    return data + explicit_element(0x0010, 0x0020, b"LO", b"DUPLICAT")


@pytest.mark.parametrize("mangle", [out_of_order, duplicate_element])
def test_elements_out_of_order_or_repeated_are_acknowledged(hostile, mangle):
    """Elements out of ascending order, or one repeated, are still readable: 0x0000 and
    delivered (the guard checks delivery)."""
    ds = mg()
    uid = str(ds.SOPInstanceUID)
    assert store(hostile, mangle(dataset_bytes(ds)), uid) == OK


def test_explicit_vr_bytes_on_implicit_context_c000(hostile):
    """Explicit VR bytes on an Implicit VR context get 0xC000: the data set must be in the
    agreed transfer syntax, or the file kept would say one encoding and hold another."""
    ds = mg()
    uid = str(ds.SOPInstanceUID)
    assert store(hostile, dataset_bytes(ds), uid, transfer_syntax=ImplicitVRLittleEndian) == C000


def test_overlong_uid_value_is_acknowledged(hostile):
    """A Study Instance UID longer than 64 characters is not the SCP's business: 0x0000 and
    delivered (the guard checks delivery)."""
    ds = mg()
    ds.StudyInstanceUID = "1.2.3." + "9" * 80
    assert store(hostile, dataset_bytes(ds), str(ds.SOPInstanceUID)) == OK


def deflate_bomb(inflated: int) -> tuple[bytes, str]:
    """A CT whose Deflated Explicit VR data set inflates to ``inflated`` bytes of zeros in a
    private OB element (about 1000 times the bytes on the wire)."""
    ds = make_mg(rows=16, cols=16, Modality="CT", SOPClassUID=CT)
    del ds.file_meta
    raw = dataset_bytes(ds) + explicit_element(0x7FE1, 0x0010, b"LO", b"HOSTILE ")
    raw += explicit_element(0x7FE1, 0x1001, b"OB", b"", inflated)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = [deflate.compress(raw)]
    zeros = b"\0" * (1 << 20)
    for start in range(0, inflated, len(zeros)):
        body.append(deflate.compress(zeros[: min(len(zeros), inflated - start)]))
    body.append(deflate.flush())
    return b"".join(body), str(ds.SOPInstanceUID)


def test_deflate_bomb_is_refused_a700_without_inflating(hostile):
    """A deflated data set of 0.3 MB that inflates to 300 MB (over node.max_dataset_mb)
    gets 0xA700, counted in 1 MB steps: the node's memory stays within the suite's bound.
    (It was acknowledged, and the node's RSS grew by about 1.1 GB.)"""
    data, uid = deflate_bomb(300_000_000)
    assert len(data) < 1_000_000
    sampler = Sampler(hostile.rss)
    sampler.start()
    try:
        status = store(hostile, data, uid, sop_class=CT, transfer_syntax=DEFLATED)
    finally:
        sampler.halt.set()
        sampler.join()
    assert status == StoreStatus.OUT_OF_RESOURCES
    growth = sampler.peak - hostile.baseline_rss
    assert growth < RSS_HEADROOM, f"node RSS grew {growth / 2**20:.0f} MB"


def test_small_deflated_data_set_is_acknowledged(hostile):
    """A deflated CT that inflates to 2 MB (under node.max_dataset_mb) is acknowledged and
    delivered (the guard checks delivery)."""
    data, uid = deflate_bomb(2_000_000)
    assert store(hostile, data, uid, sop_class=CT, transfer_syntax=DEFLATED) == OK


def test_ct_on_forward_route_is_delivered(hostile, tmp_path):
    """A CT instance on the forward route gets 0x0000 and reaches the sink byte for byte."""
    path = write_ct(tmp_path / "ct.dcm")
    ct = pydicom.dcmread(path)
    uid = str(ct.SOPInstanceUID)
    del ct.file_meta
    data = dataset_bytes(ct)
    assert store(hostile, data, uid, sop_class=CT) == OK
    assert sink_copy(hostile, uid).PixelData == ct.PixelData


def test_same_instance_twice_both_acknowledged(hostile):
    """The same instance sent twice is acknowledged twice; every copy at the sink is the
    same instance with the same pixels."""
    ds = mg()
    uid = str(ds.SOPInstanceUID)
    data = dataset_bytes(ds)
    assert store(hostile, data, uid) == OK
    assert store(hostile, data, uid) == OK
    copies = [pydicom.dcmread(p) for p in wait_for(lambda: hostile.received().get(uid), 60)]
    assert all(c.PixelData == ds.PixelData and c.PatientName == ds.PatientName for c in copies)


def test_valid_mg_control(hostile):
    """Control: a whole, valid MG instance sent the same way gets 0x0000 and is delivered."""
    ds = mg()
    assert store(hostile, dataset_bytes(ds), str(ds.SOPInstanceUID)) == OK
