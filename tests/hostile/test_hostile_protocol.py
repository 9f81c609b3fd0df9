"""Hostile suite, protocol abuse: hand-built PDUs and broken peers over raw sockets.

Each case asserts the node's exact answer (an A-ASSOCIATE-RJ, an A-ABORT, a C-STORE status,
or the socket closed within a deadline); the ``guard`` fixture (conftest.py) then checks that
the node is up, answers C-ECHO, kept its memory bounded and delivered what it acknowledged.
"""

from __future__ import annotations

import struct

import pdu
import pytest
from dicom_factory import make_mg
from peers import wait_for
from raw_peer import (
    CT,
    EXPLICIT,
    MG,
    PER_PEER,
    TIMEOUT_S,
    answer_of,
    associate,
    closed_within,
    connect,
    dataset_bytes,
    echo_from,
    fresh_source,
    reject_fields,
    send_store,
    store_status,
)

from mr2nst.node.dicom.status import AssociateReject, StoreStatus

pytestmark = pytest.mark.e2e  # like tests/e2e: real peers, run by `make test`

# A deadline for "the node closes the socket": its network timeout plus a generous margin.
CLOSE_S = TIMEOUT_S + 7


def mg_bytes() -> tuple[bytes, str]:
    ds = make_mg(rows=32, cols=24)
    del ds.file_meta
    return dataset_bytes(ds), str(ds.SOPInstanceUID)


def logged_store(hostile, uid: str) -> bool:
    """Whether the node logged a stage_receive (stored or refused) for ``uid``."""
    return any(
        e.get("event") == "stage_receive" and e.get("sop_uid") == uid
        for e in hostile.serve.events()
    )


# --- before an association: not DICOM at all ------------------------------------------

TLS_CLIENT_HELLO = bytes.fromhex(
    "16030100a5010000a10303" + "00" * 32 + "00" + "0020" + "c02bc02fc02cc030cca9cca8c013c014"
    "009c009d002f0035000a0100" + "0058" + "000000140012000010" + "6e6f64652e6578616d706c65"
    "2e6f7267" + "000b000403000102000a000c000a001d0017001e00190018000d0020001e0403050306030807"
    "08080809080a080b080408050806040105010601" + "0016000000170000"
)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x5a" * 4096,
        b"GET / HTTP/1.1\r\nHost: node\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
        TLS_CLIENT_HELLO,
        pdu.p_data([(1, 0x03, b"\x00" * 16)]),
        pdu.release_rq(),
        pdu.pdu(0x09, b"\x00" * 16),
        pdu.pdu(0xFF, b""),
    ],
    ids=[
        "garbage-4k",
        "http-get",
        "tls-client-hello",
        "p-data-first",
        "release-first",
        "pdu-type-9",
        "pdu-type-ff",
    ],
)
def test_not_an_association_request_is_closed(hostile, payload):
    """Bytes that do not start an association (garbage, HTTP, TLS, a PDU out of order or of
    unknown type) get an A-ABORT and the socket closed within the deadline."""
    with connect(hostile.port) as sock:
        sock.sendall(payload)
        assert answer_of(sock, CLOSE_S) == pdu.ABORT
        assert closed_within(sock, CLOSE_S)


def test_trickled_associate_request_is_cut_off(hostile):
    """An A-ASSOCIATE-RQ sent a byte at a time (about 5 bytes/s) is cut off by the per-PDU
    deadline long before it is complete."""
    rq = pdu.associate_rq([(1, MG, [EXPLICIT])])
    with connect(hostile.port) as sock:
        assert closed_within(sock, CLOSE_S, trickle=rq)


def test_header_claiming_4_gb_is_refused_unbuffered(hostile):
    """A PDU header claiming ~4 GB, then a stream of bytes: the node closes the socket
    before 256 MB were sent (the guard checks it did not buffer them)."""
    chunk = b"\x00" * (1 << 20)
    refused = False
    with connect(hostile.port) as sock:
        sock.settimeout(CLOSE_S)
        sock.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFF0))
        for _ in range(256):
            try:
                sock.sendall(chunk)
            except OSError:
                refused = True
                break
        refused = refused or closed_within(sock, CLOSE_S)
    assert refused


def test_silent_connection_is_closed(hostile):
    """A connection that never sends a byte is closed after the network timeout."""
    with connect(hostile.port) as sock:
        assert closed_within(sock, CLOSE_S)


def test_twenty_connect_and_close_leave_no_slots_taken(hostile):
    """20 connections from one address opened and closed at once free their per-peer slots:
    a C-ECHO from that address soon after is served (the limit is 3 per peer)."""
    source = fresh_source()
    for _ in range(20):
        connect(hostile.port, source).close()
    wait_for(lambda: echo_from(hostile.port, source), CLOSE_S, "a C-ECHO from the same address")


def test_cut_connection_frees_its_slot(hostile):
    """Three connections from one address cut for garbage free their slots within the
    network timeout (plus margin): the same address is then served again."""
    source = fresh_source()
    for _ in range(PER_PEER):
        with connect(hostile.port, source) as sock:
            sock.sendall(b"\x5a" * 64)
            assert closed_within(sock, CLOSE_S)
    wait_for(lambda: echo_from(hostile.port, source), CLOSE_S, "a C-ECHO from the same address")


# --- the A-ASSOCIATE-RQ itself --------------------------------------------------------


def test_caller_not_on_allow_list_is_rejected(hostile):
    """A calling AE not on node.allowed_callers gets A-ASSOCIATE-RJ rejected-permanent,
    service-user, calling AE not recognised."""
    with connect(hostile.port) as sock:
        sock.sendall(pdu.associate_rq([(1, MG, [EXPLICIT])], calling="STRANGER"))
        assert reject_fields(sock) == (
            AssociateReject.REJECTED_PERMANENT,
            AssociateReject.SOURCE_SERVICE_USER,
            AssociateReject.CALLING_AE_NOT_RECOGNISED,
        )


def test_abstract_syntax_uid_too_long_aborts(hostile):
    """A presentation context whose abstract syntax UID has 70 characters (64 at most)
    gets an A-ABORT, never an association."""
    with connect(hostile.port) as sock:
        sock.sendall(pdu.associate_rq([(1, "9" * 70, [EXPLICIT])]))
        assert answer_of(sock) == pdu.ABORT
        assert closed_within(sock, CLOSE_S)


def test_abort_before_association_is_closed(hostile):
    """An A-ABORT as the first PDU gets the socket closed, with nothing sent back."""
    with connect(hostile.port) as sock:
        sock.sendall(pdu.abort())
        assert answer_of(sock) is None
        assert closed_within(sock, CLOSE_S)


def test_protocol_version_2_is_rejected(hostile):
    """An A-ASSOCIATE-RQ with protocol version 2 gets A-ASSOCIATE-RJ: rejected-permanent,
    service-provider (ACSE), protocol version not supported."""
    with connect(hostile.port) as sock:
        sock.sendall(pdu.associate_rq([(1, MG, [EXPLICIT])], version=2))
        assert reject_fields(sock) == (0x01, 0x02, 0x02)


def test_no_presentation_contexts(hostile):
    """An A-ASSOCIATE-RQ without presentation contexts is accepted with none (pynetdicom's
    answer; nothing can be sent on it) and releases cleanly."""
    with connect(hostile.port) as sock:
        sock.sendall(pdu.associate_rq([]))
        answer = pdu.read_pdu(sock)
        assert answer is not None and answer[0] == pdu.ASSOCIATE_AC
        assert pdu.accepted_contexts(answer[1]) == {}
        sock.sendall(pdu.release_rq())
        assert answer_of(sock) == pdu.RELEASE_RP


def test_presentation_context_overrunning_pdu_is_closed(hostile):
    """A presentation-context item whose length runs past the end of the PDU gets an A-ABORT
    and the socket closed, never an association."""
    rq = bytearray(pdu.associate_rq([(1, MG, [EXPLICIT])]))
    at = rq.index(b"\x20\x00", 6 + 68)
    rq[at + 2 : at + 4] = struct.pack(">H", 0xFFF0)
    with connect(hostile.port) as sock:
        sock.sendall(bytes(rq))
        assert answer_of(sock) == pdu.ABORT
        assert closed_within(sock, CLOSE_S)


# --- inside an association ------------------------------------------------------------


def test_second_associate_request_aborts(hostile):
    """A second A-ASSOCIATE-RQ inside an established association gets an A-ABORT, then the
    socket closed."""
    with associate(hostile.port) as sock:
        sock.sendall(pdu.associate_rq([(1, MG, [EXPLICIT])]))
        assert answer_of(sock) == pdu.ABORT
        assert closed_within(sock, CLOSE_S)


def test_established_then_silent_is_closed(hostile):
    """An association that goes silent is ended (A-ABORT or release, then close) after the
    network timeout."""
    with associate(hostile.port) as sock:
        assert closed_within(sock, CLOSE_S)


@pytest.mark.parametrize("ending", ["abort", "tcp-close"])
def test_half_a_store_then_gone_stores_nothing(hostile, ending):
    """Half a C-STORE (command and half the data set), then an A-ABORT or a TCP close: the
    node stores nothing and delivers nothing."""
    data, uid = mg_bytes()
    with associate(hostile.port) as sock:
        sock.sendall(pdu.p_data([(1, 0x03, pdu.c_store_rq(MG, uid))]))
        sock.sendall(pdu.p_data([(1, 0x00, data[: len(data) // 2])]))
        if ending == "abort":
            sock.sendall(pdu.abort())
    hostile.refuse(uid)
    assert echo_from(hostile.port, fresh_source())  # the node has handled the peer's end by now
    assert not logged_store(hostile, uid)


def test_p_data_on_unagreed_context_aborts(hostile):
    """A C-STORE on presentation context 99, never proposed: A-ABORT, close, nothing stored."""
    data, uid = mg_bytes()
    with associate(hostile.port) as sock:
        send_store(sock, data, MG, uid, context_id=99)
        assert answer_of(sock) == pdu.ABORT
        assert closed_within(sock, CLOSE_S)
    hostile.refuse(uid)
    assert not logged_store(hostile, uid)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (struct.pack(">LB", 5000, 1) + b"\x03" + bytes(20), pdu.ABORT),
        (struct.pack(">L", 0), pdu.ABORT),
        (struct.pack(">LB", 1, 1), None),
    ],
    ids=["pdv-length-overruns-pdu", "pdv-length-0", "pdv-length-1"],
)
def test_malformed_pdv_item(hostile, body, expected):
    """A P-DATA-TF whose PDV item length overruns the PDU, is 0, or is too short for its
    header: A-ABORT (or, for the last, an immediate close without one), then closed."""
    with associate(hostile.port) as sock:
        sock.sendall(pdu.pdu(pdu.P_DATA_TF, body))
        assert answer_of(sock) == expected
        assert closed_within(sock, CLOSE_S)


def test_data_set_without_command(hostile):
    """A data set fragment with no C-STORE command before it: A-ABORT, close, not stored."""
    data, uid = mg_bytes()
    with associate(hostile.port) as sock:
        sock.sendall(pdu.p_data([(1, 0x02, data)]))
        assert answer_of(sock) == pdu.ABORT
        assert closed_within(sock, CLOSE_S)
    hostile.refuse(uid)
    assert not logged_store(hostile, uid)


def test_second_command_inside_a_data_set(hostile):
    """A C-STORE whose data set is interrupted by a second C-STORE command: the first
    request gets 0xA900 (what arrived does not match it), the second no response; neither
    instance is stored or delivered."""
    first, first_uid = mg_bytes()
    second, second_uid = mg_bytes()
    with associate(hostile.port) as sock:
        sock.sendall(pdu.p_data([(1, 0x03, pdu.c_store_rq(MG, first_uid))]))
        sock.sendall(pdu.p_data([(1, 0x00, first[:1000])]))
        send_store(sock, second, MG, second_uid)
        assert store_status(sock) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert store_status(sock, CLOSE_S) is None
    hostile.refuse(first_uid)
    hostile.refuse(second_uid)


def test_garbage_command_set_aborts(hostile):
    """A command fragment of garbage gets the socket closed (no response, no A-ABORT)."""
    with associate(hostile.port) as sock:
        sock.sendall(pdu.p_data([(1, 0x03, b"\x13\x37" * 50)]))
        assert answer_of(sock, CLOSE_S) is None  # closed, no response and no A-ABORT
        assert closed_within(sock, CLOSE_S)


def test_store_command_saying_no_data_set(hostile):
    """A C-STORE-RQ whose command says no data set follows gets 0xC000 (logged as refused)
    and nothing is delivered."""
    data, uid = mg_bytes()
    with associate(hostile.port) as sock:
        sock.sendall(pdu.p_data([(1, 0x03, pdu.c_store_rq(MG, uid, has_data=False))]))
        assert store_status(sock) == StoreStatus.CANNOT_UNDERSTAND
    hostile.refuse(uid)
    assert logged_store(hostile, uid)


def test_per_peer_limit(hostile):
    """Beyond node.max_associations_per_peer one IP's next connection is closed; a caller
    from another address (127.0.0.2) is still served meanwhile."""
    source = fresh_source()
    held = [connect(hostile.port, source) for _ in range(PER_PEER)]
    try:
        for sock in held:  # make sure each holds a slot: it has an association
            sock.sendall(pdu.associate_rq([(1, MG, [EXPLICIT])]))
            assert answer_of(sock) == pdu.ASSOCIATE_AC
        with connect(hostile.port, source) as extra:
            extra.sendall(pdu.associate_rq([(1, MG, [EXPLICIT])]))
            assert answer_of(extra, 5) is None  # closed unread, no PDU
            assert closed_within(extra, 5)
        assert echo_from(hostile.port, source=fresh_source())
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize("max_pdu", [0, 64], ids=["unlimited", "tiny"])
def test_peer_maximum_pdu_still_stores(hostile, max_pdu):
    """A peer announcing maximum PDU 0 (unlimited) or a tiny one, and sending its data set in
    100-byte PDVs, still gets 0x0000 (the guard checks delivery)."""
    data, uid = mg_bytes()
    with associate(hostile.port, [(1, MG, [EXPLICIT])], max_pdu=max_pdu) as sock:
        send_store(sock, data, MG, uid, fragment=100)
        status = store_status(sock)
        hostile.record(uid, status)
        assert status == StoreStatus.SUCCESS
        sock.sendall(pdu.release_rq())
        assert answer_of(sock) == pdu.RELEASE_RP


def test_abort_right_after_store_response(hostile):
    """The peer aborts the moment it has its C-STORE response: acknowledged => delivered."""
    data, uid = mg_bytes()
    with associate(hostile.port) as sock:
        send_store(sock, data, MG, uid)
        status = store_status(sock)
        hostile.record(uid, status)
        sock.sendall(pdu.abort())
    assert status == StoreStatus.SUCCESS


def test_ct_and_mg_in_one_raw_association(hostile):
    """Control for the raw path: an MG and a CT in one association, each 0x0000."""
    data, uid = mg_bytes()
    ct = make_mg(rows=16, cols=16, Modality="CT", SOPClassUID=CT)
    del ct.file_meta
    with associate(hostile.port) as sock:
        send_store(sock, data, MG, uid)
        assert store_status(sock) == StoreStatus.SUCCESS
        hostile.ack(uid)
        send_store(sock, dataset_bytes(ct), CT, str(ct.SOPInstanceUID), context_id=3, fragment=1000)
        status = store_status(sock)
        hostile.record(str(ct.SOPInstanceUID), status)
        assert status == StoreStatus.SUCCESS
        sock.sendall(pdu.release_rq())
        assert answer_of(sock) == pdu.RELEASE_RP
