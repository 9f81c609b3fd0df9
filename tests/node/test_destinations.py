"""Tests of the DICOM destination: per-destination settings, transcoding, errors, the registry.

The STOW-RS destination has its own tests (test_stow.py)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import make_mg, recode
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt

from mr2nst.node.config import parse_config
from mr2nst.node.dicom.transcode import transcode
from mr2nst.node.service.destinations import (
    DicomStoreDestination,
    SendResult,
    Timeouts,
    build_destinations,
)
from mr2nst.node.service.stow import StowDestination

WAIT_S = 10.0  # upper bound for waits on other threads; never reached when things work


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write(tmp_path: Path, ds: Dataset, name: str = "in.dcm") -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def config(destinations: dict, **sections: dict):
    return parse_config({"destinations": destinations, **sections}, environ={})


# --- a DICOM peer ------------------------------------------------------------------------


@dataclass
class Received:
    calling_ae: str
    transfer_syntax: str
    proposed: list[str]
    dataset: Dataset


@dataclass
class Peer:
    """A pynetdicom storage SCP that records what it gets; ``hold`` makes C-STOREs wait."""

    syntaxes: list[str]
    hold: bool = False
    received: list[Received] = field(default_factory=list)
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    release: threading.Event = field(default_factory=threading.Event)
    active: int = 0
    most_active: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        ae = AE("PEER")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, self.syntaxes)
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        self.entered.release()
        if self.hold:
            self.release.wait(WAIT_S)
        ds = event.dataset
        ds.file_meta = event.file_meta
        proposed = [
            ts
            for cx in event.assoc.requestor.requested_contexts
            if cx.abstract_syntax == event.context.abstract_syntax
            for ts in cx.transfer_syntax
        ]
        with self._lock:
            self.active -= 1
            self.received.append(
                Received(
                    event.assoc.requestor.ae_title,
                    event.context.transfer_syntax,
                    proposed,
                    ds,
                )
            )
        return 0x0000

    def destination(self, **settings: object) -> dict:
        return {"ae_title": "PEER", "host": "127.0.0.1", "port": self.port, **settings}


@pytest.fixture
def peer() -> Iterator[Peer]:
    """A storage SCP that accepts uncompressed and JPEG 2000 lossless images."""
    scp = Peer([ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless])
    yield scp
    scp.release.set()
    scp.server.shutdown()


def dicom_destination(peer: Peer, **settings: object) -> DicomStoreDestination:
    dest = build_destinations(config({"peer": peer.destination(**settings)}))["peer"]
    assert isinstance(dest, DicomStoreDestination)
    return dest


def test_registry_builds_each_kind():
    """Each kind in the config gets its class: dicom -> C-STORE, stow -> STOW-RS."""
    dests = build_destinations(
        config(
            {
                "cad": {"ae_title": "CAD", "host": "127.0.0.1", "port": 104},
                "web": {"kind": "stow", "url": "http://127.0.0.1:8042/dicom-web"},
            }
        )
    )
    assert isinstance(dests["cad"], DicomStoreDestination)
    assert isinstance(dests["web"], StowDestination) and dests["web"].name == "web"


def test_calling_ae_comes_from_destination_then_forwarding_then_node(tmp_path, peer):
    """The calling AE is the destination's own, else forwarding.calling_ae, else node.ae_title."""
    path = str(write(tmp_path, make_mg()))
    own = {"a": peer.destination(calling_ae="OWN"), "b": peer.destination()}
    for sections, name, expected in [
        ({}, "a", "OWN"),
        ({"forwarding": {"calling_ae": "FWD"}}, "b", "FWD"),
        ({"node": {"ae_title": "NODE"}}, "b", "NODE"),
    ]:
        dest = build_destinations(config(own, **sections))[name]
        assert dest.send(path).ok
        assert peer.received[-1].calling_ae == expected


def test_timeouts_default_to_the_network_timeout():
    """A timeout of 0 means node.network_timeout_s; set ones are the destination's own."""
    cfg = config(
        {
            "a": {"ae_title": "A", "host": "h", "port": 1},
            "b": {"ae_title": "B", "host": "h", "port": 1, "connect_timeout_s": 2, "timeout_s": 7},
        },
        node={"network_timeout_s": 42},
    )
    assert Timeouts.of(cfg.destinations["a"], cfg) == Timeouts(42, 42)
    assert Timeouts.of(cfg.destinations["b"], cfg) == Timeouts(2, 7)


def test_as_received_sends_the_stored_syntax(tmp_path, peer):
    """as-received proposes the file's syntax and sends it unchanged."""
    src = recode(make_mg(), JPEG2000Lossless)
    path = write(tmp_path, src)
    assert dicom_destination(peer).send(str(path)) == SendResult(True, 0)
    [got] = peer.received
    assert got.transfer_syntax == JPEG2000Lossless
    assert got.dataset.PixelData == src.PixelData


def test_explicit_little_decompresses_and_proposes_only_it(tmp_path, peer):
    """explicit-little decompresses, proposes only Explicit VR LE and keeps the UID."""
    src = recode(make_mg(), JPEG2000Lossless)
    pixels = src.pixel_array.copy()
    path = write(tmp_path, src)
    result = dicom_destination(peer, transfer_syntax="explicit-little").send(str(path))
    assert result.ok
    [got] = peer.received
    assert got.transfer_syntax == ExplicitVRLittleEndian
    assert got.proposed == [ExplicitVRLittleEndian]
    assert got.dataset.SOPInstanceUID == src.SOPInstanceUID
    assert np.array_equal(got.dataset.pixel_array, pixels)


def test_j2k_lossless_compresses_losslessly(tmp_path, peer):
    """j2k-lossless sends JPEG 2000 lossless with the same pixels and the same UID."""
    src = make_mg(bits_stored=14, photometric="MONOCHROME1")
    pixels = src.pixel_array.copy()
    path = write(tmp_path, src)
    assert dicom_destination(peer, transfer_syntax="j2k-lossless").send(str(path)).ok
    [got] = peer.received
    assert got.transfer_syntax == JPEG2000Lossless and got.proposed == [JPEG2000Lossless]
    assert got.dataset.SOPInstanceUID == src.SOPInstanceUID
    assert np.array_equal(got.dataset.pixel_array, pixels)


def test_j2k_lossless_from_another_compression(tmp_path, peer):
    """A JPEG-LS source is decompressed and re-encoded as JPEG 2000 lossless."""
    src = make_mg()
    pixels = src.pixel_array.copy()
    try:
        src = recode(src, JPEGLSLossless, tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    path = write(tmp_path, src)
    assert dicom_destination(peer, transfer_syntax="j2k-lossless").send(str(path)).ok
    [got] = peer.received
    assert got.transfer_syntax == JPEG2000Lossless
    assert np.array_equal(got.dataset.pixel_array, pixels)


def test_instance_without_pixels_goes_explicit_little():
    """A data set without Pixel Data has nothing to compress: j2k-lossless sends it explicit."""
    ds = make_mg(PixelData=None)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert transcode(ds, "j2k-lossless").file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_transcode_failure_is_permanent_with_reason(tmp_path, peer):
    """Pixel data that cannot be decoded cannot be transcoded: permanent, and says so."""
    src = recode(make_mg(), JPEG2000Lossless)
    src.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    path = write(tmp_path, src)
    result = dicom_destination(peer, transfer_syntax="explicit-little").send(str(path))
    assert not result.ok and result.permanent and result.status is None
    assert "transfer_syntax explicit-little: cannot transcode from JPEG 2000" in result.error
    assert peer.received == []


def test_big_endian_source_is_refused_clearly(tmp_path):
    """A retired big endian source is a clear error, not a wrong byte order on the wire."""
    try:
        src = recode(make_mg(), ExplicitVRBigEndian, tmp_path)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    with pytest.raises(ValueError, match="Big Endian"):
        transcode(src, "explicit-little")


def test_peer_without_the_syntax_is_a_permanent_failure(tmp_path):
    """A peer that accepts none of the proposed contexts (no J2K) is a configuration matter."""
    scp = Peer([ExplicitVRLittleEndian])
    try:
        path = write(tmp_path, make_mg())
        result = dicom_destination(scp, transfer_syntax="j2k-lossless").send(str(path))
    finally:
        scp.server.shutdown()
    assert not result.ok and result.permanent
    assert "accepted none of the proposed presentation contexts" in result.error


def test_refused_connection_says_connection_refused(tmp_path):
    """A closed port is reported as 'connection refused' (not 'aborted'), and retried."""
    port = closed_port()
    dest = build_destinations(
        config({"cad": {"ae_title": "CAD", "host": "127.0.0.1", "port": port}})
    )["cad"]
    result = dest.send(str(write(tmp_path, make_mg())))
    assert not result.ok and not result.permanent
    assert result.error == f"cannot connect to CAD@127.0.0.1:{port}: connection refused"


def test_silent_peer_times_out_with_the_destination_timeout(tmp_path):
    """A peer that accepts TCP but never answers fails after the destination's timeout_s."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        dest = build_destinations(
            config(
                {"cad": {"ae_title": "CAD", "host": "127.0.0.1", "port": port, "timeout_s": 0.5}}
            )
        )["cad"]
        result = dest.send(str(write(tmp_path, make_mg())))
    assert not result.ok and not result.permanent
    assert "no answer from CAD@127.0.0.1" in result.error and "within 0.5s" in result.error


def test_max_associations_caps_concurrent_sends(tmp_path):
    """With max_associations = 1, three parallel sends reach the peer one at a time."""
    scp = Peer([ExplicitVRLittleEndian], hold=True)
    try:
        dest = dicom_destination(scp, max_associations=1)
        paths = [str(write(tmp_path, make_mg(seed=i), f"{i}.dcm")) for i in range(3)]
        results: list[SendResult] = []
        threads = [threading.Thread(target=lambda p=p: results.append(dest.send(p))) for p in paths]
        for t in threads:
            t.start()
        assert scp.entered.acquire(timeout=WAIT_S)  # the first send is at the peer ...
        assert not scp.entered.acquire(timeout=1.0)  # ... and no second one gets there
        scp.release.set()
        for t in threads:
            t.join(WAIT_S)
    finally:
        scp.release.set()
        scp.server.shutdown()
    assert len(results) == 3 and all(r.ok for r in results)
    assert scp.most_active == 1 and len(scp.received) == 3


def test_without_max_associations_sends_run_in_parallel(tmp_path):
    """Without a cap of its own, parallel sends reach the peer together (the cap's control)."""
    scp = Peer([ExplicitVRLittleEndian], hold=True)
    try:
        dest = dicom_destination(scp)
        paths = [str(write(tmp_path, make_mg(seed=i), f"{i}.dcm")) for i in range(2)]
        threads = [threading.Thread(target=dest.send, args=(p,)) for p in paths]
        for t in threads:
            t.start()
        assert scp.entered.acquire(timeout=WAIT_S) and scp.entered.acquire(timeout=WAIT_S)
        scp.release.set()
        for t in threads:
            t.join(WAIT_S)
    finally:
        scp.release.set()
        scp.server.shutdown()
    assert scp.most_active == 2
