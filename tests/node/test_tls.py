"""DICOM TLS: config checks, the TLS SCP (pynetdicom callers) and TLS destinations."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from dicom_factory import make_mg
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from tls_certs import OPENSSL, Certs, make_certs

from mr2nst.node.config import parse_config
from mr2nst.node.dicom.status import StoreStatus
from mr2nst.node.errors import ConfigError
from mr2nst.node.ledger import Ledger
from mr2nst.node.service import scp
from mr2nst.node.service.destinations import DicomStoreDestination, build_destinations
from mr2nst.node.service.routing import Router
from mr2nst.node.service.spool import Spool
from mr2nst.node.service.tls import client_context, server_context

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    """A CA, a server and a client certificate signed by it, and a wrong one."""
    return make_certs(tmp_path_factory.mktemp("pki"))


def tls_section(certs: Certs, **overrides: object) -> dict:
    return {
        "certificate": str(certs.server.cert),
        "private_key": str(certs.server.key),
        "ca_certificates": str(certs.ca),
        **overrides,
    }


@pytest.fixture
def node(tmp_path):
    """Starts SCPs on ephemeral ports with a [tls] section; stops them after."""
    started: list = []

    def start(tls: dict, use_tls: bool | None = None):
        cfg = parse_config(
            {
                "node": {
                    "host": "127.0.0.1",
                    "data_dir": str(tmp_path / "data"),
                    "min_free_disk_mb": 0,
                    "network_timeout_s": 5,
                },
                "tls": tls,
            },
            environ={},
        )
        spool = Spool(cfg.node.data_dir).create()
        ledger = Ledger.open(cfg.ledger_url)
        service = scp.StoreService(spool, ledger, Router(cfg.routes), 0, scp.Allowlist.parse(()))
        server = scp.start_scp(cfg, service, port=0, tls=use_tls)
        started.append((server, ledger))
        return SimpleNamespace(port=int(server.server_address[1]), ledger=ledger)

    yield start
    for server, ledger in started:
        server.shutdown()
        ledger.close()


def client(
    certs: Certs, pair: object = None, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A caller's context that trusts the test CA, optionally with a client certificate."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)  # type: ignore[attr-defined]
    if maximum is not None:
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = maximum
    return context


def associate(port: int, context: ssl.SSLContext | None, ds=None):
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    if ds is None:
        ae.add_requested_context(Verification, ImplicitVRLittleEndian)
    else:
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    tls_args = None if context is None else (context, "127.0.0.1")
    return ae.associate("127.0.0.1", port, ae_title="MR2NST", tls_args=tls_args)


def echo(port: int, context: ssl.SSLContext | None) -> int | None:
    assoc = associate(port, context)
    if not assoc.is_established:
        return None
    rsp = assoc.send_c_echo()
    assoc.release()
    return int(rsp.Status)


# --- config ---------------------------------------------------------------------------


def test_tls_section_defaults_are_off():
    """Without [tls] the node speaks plaintext only."""
    cfg = parse_config({}, environ={})
    assert not cfg.tls.require and cfg.tls.port == 0 and not cfg.tls.enabled


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"require": True}, "tls.require: needs certificate and private_key"),
        ({"port": 11113}, "tls.port: needs certificate and private_key"),
        ({"verify_clients": True}, "tls.verify_clients: needs ca_certificates"),
        ({"certificate": "/nonexistent.pem", "private_key": "/nonexistent.key"}, "tls.certificate"),
    ],
)
def test_tls_section_is_checked_at_load(tls, message):
    """A [tls] section that cannot work fails at load with a message naming the key."""
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config({"tls": tls}, environ={})


def test_unloadable_key_names_private_key(certs):
    """A certificate with someone else's key is refused at load, naming private_key."""
    tls = tls_section(certs, private_key=str(certs.client.key), require=True)
    with pytest.raises(ConfigError, match=r"^tls\.private_key: "):
        parse_config({"tls": tls}, environ={})


def test_garbage_ca_file_names_ca_certificates(certs, tmp_path):
    """A ca_certificates file that is not PEM is refused at load, naming the key."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^tls\.ca_certificates: "):
        parse_config({"tls": tls_section(certs, ca_certificates=str(bad))}, environ={})


def test_tls_port_must_differ_from_node_port(certs):
    """tls.port equal to node.port is a config error."""
    with pytest.raises(ConfigError, match=r"^tls\.port: "):
        parse_config({"node": {"port": 4242}, "tls": tls_section(certs, port=4242)}, environ={})


def test_destination_tls_keys_need_tls(certs):
    """ca_certificates on a destination without tls = true is an error naming the key."""
    dest = {"ae_title": "CAD", "host": "127.0.0.1", "port": 104, "ca_certificates": str(certs.ca)}
    with pytest.raises(ConfigError, match=r"^destinations\.cad\.ca_certificates: "):
        parse_config({"destinations": {"cad": dest}}, environ={})


def test_destination_certificate_needs_its_key(certs):
    """A destination client certificate without private_key is an error naming the key."""
    dest = {
        "ae_title": "CAD",
        "host": "127.0.0.1",
        "port": 104,
        "tls": True,
        "certificate": str(certs.client.cert),
    }
    with pytest.raises(ConfigError, match=r"^destinations\.cad\.private_key: "):
        parse_config({"destinations": {"cad": dest}}, environ={})


def test_contexts_require_tls_1_2(certs):
    """Both the server's and a destination's contexts refuse anything older than TLS 1.2."""
    cfg = parse_config(
        {
            "tls": tls_section(certs, require=True),
            "destinations": {
                "cad": {"ae_title": "CAD", "host": "localhost", "port": 1, "tls": True}
            },
        },
        environ={},
    )
    assert server_context(cfg.tls).minimum_version == ssl.TLSVersion.TLSv1_2
    dest = client_context(cfg.destinations["cad"])
    assert dest.minimum_version == ssl.TLSVersion.TLSv1_2
    assert dest.check_hostname and dest.verify_mode == ssl.CERT_REQUIRED


# --- the SCP ----------------------------------------------------------------------------


def test_tls_echo_and_store(node, certs):
    """A TLS caller that trusts the node's CA can C-ECHO and C-STORE."""
    n = node(tls_section(certs, require=True))
    assert echo(n.port, client(certs)) == 0x0000
    ds = make_mg()
    assoc = associate(n.port, client(certs), ds)
    assert assoc.is_established
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert int(rsp.Status) == StoreStatus.SUCCESS
    [row] = n.ledger.queue(include_done=True)
    assert pydicom.dcmread(row["spool_path"]).SOPInstanceUID == ds.SOPInstanceUID


def drain(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection (a reset counts as closed)."""
    data = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError("the connection stayed open")


def test_plaintext_caller_is_refused_on_a_tls_port(node, certs):
    """On a TLS-only port a plaintext caller gets no association and the socket closes."""
    n = node(tls_section(certs, require=True))
    assert echo(n.port, None) is None
    with socket.create_connection(("127.0.0.1", n.port), timeout=10) as sock:
        sock.sendall(b"\x01\x00" + b"\x00" * 200)  # the start of an A-ASSOCIATE-RQ
        received = drain(sock)
    assert not received.startswith(b"\x02")  # no A-ASSOCIATE-AC: a TLS alert, then closed
    assert echo(n.port, client(certs)) == 0x0000  # still serving TLS callers
    assert n.ledger.queue(include_done=True) == []


def test_silent_caller_does_not_block_the_tls_port(node, certs):
    """A caller that connects and never starts the handshake is cut off after a timeout."""
    n = node(tls_section(certs, require=True))
    with socket.create_connection(("127.0.0.1", n.port), timeout=30) as silent:
        assert echo(n.port, client(certs)) == 0x0000
        assert drain(silent) == b""  # closed by the node


def test_plaintext_stays_on_node_port_unless_required(node, certs):
    """Without tls.require (tls=False) the same config's node port speaks plaintext."""
    n = node(tls_section(certs), use_tls=False)
    assert echo(n.port, None) == 0x0000
    assert echo(n.port, client(certs)) is None


def test_client_certificates_are_verified(node, certs):
    """With verify_clients, a caller without a certificate or with a wrong one is refused."""
    n = node(tls_section(certs, require=True, verify_clients=True))
    assert echo(n.port, client(certs)) is None
    assert echo(n.port, client(certs, certs.wrong)) is None
    assert echo(n.port, client(certs, certs.client)) == 0x0000


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_1_1_is_refused(node, certs):
    """A caller limited to TLS 1.1 cannot associate."""
    n = node(tls_section(certs, require=True))
    assert echo(n.port, client(certs, maximum=ssl.TLSVersion.TLSv1_1)) is None
    assert echo(n.port, client(certs, maximum=ssl.TLSVersion.TLSv1_2)) == 0x0000


# --- destinations -----------------------------------------------------------------------


class TlsPeer:
    """A pynetdicom storage SCP speaking TLS (optionally verifying client certificates)."""

    def __init__(self, certs: Certs, pair: object, verify_clients: bool = False) -> None:
        self.received: list[str] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert, pair.key)  # type: ignore[attr-defined]
        if verify_clients:
            context.load_verify_locations(cafile=str(certs.ca))
            context.verify_mode = ssl.CERT_REQUIRED
        ae = AE("PEER")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
            ssl_context=context,
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


@pytest.fixture
def peers():
    """TLS peers, shut down after the test."""
    made: list[TlsPeer] = []

    def make(*args, **kwargs) -> TlsPeer:
        made.append(TlsPeer(*args, **kwargs))
        return made[-1]

    yield make
    for peer in made:
        peer.server.shutdown()


def tls_destination(peer: TlsPeer, host: str = "127.0.0.1", **settings) -> DicomStoreDestination:
    dest = {"ae_title": "PEER", "host": host, "port": peer.port, "tls": True, **settings}
    cfg = parse_config(
        {"destinations": {"peer": dest}, "forwarding": {"max_attempts": 1}}, environ={}
    )
    built = build_destinations(cfg)["peer"]
    assert isinstance(built, DicomStoreDestination)
    return built


def write(tmp_path: Path):
    ds = make_mg()
    path = tmp_path / "mg.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, str(path)


def test_destination_sends_over_tls_with_client_certificate(tmp_path, certs, peers):
    """A tls destination verifies the peer against its CA and authenticates with its cert."""
    peer = peers(certs, certs.server, verify_clients=True)
    ds, path = write(tmp_path)
    dest = tls_destination(
        peer,
        ca_certificates=str(certs.ca),
        certificate=str(certs.client.cert),
        private_key=str(certs.client.key),
    )
    result = dest.send(path)
    assert result.ok, result.error
    assert peer.received == [ds.SOPInstanceUID]


def test_destination_refuses_an_untrusted_peer(tmp_path, certs, peers):
    """A peer whose certificate the destination's CA did not sign gets nothing."""
    peer = peers(certs, certs.wrong)
    _, path = write(tmp_path)
    result = tls_destination(peer, ca_certificates=str(certs.ca)).send(path)
    assert not result.ok and not result.permanent
    assert "CERTIFICATE_VERIFY_FAILED" in result.error
    assert peer.received == []


def test_destination_checks_the_host_name(tmp_path, certs, peers):
    """A certificate that does not name the host is refused unless tls_verify_hostname = false."""
    peer = peers(certs, certs.server)  # SAN: 127.0.0.1 and localhost
    _, path = write(tmp_path)
    # The name pynetdicom verifies is the second item of tls_args (normally `host`).
    wrong_name = tls_destination(peer, ca_certificates=str(certs.ca))
    wrong_name.tls_args = (wrong_name.tls_args[0], "pacs.example.org")  # type: ignore[index]
    assert not wrong_name.send(path).ok
    relaxed = tls_destination(peer, ca_certificates=str(certs.ca), tls_verify_hostname=False)
    relaxed.tls_args = (relaxed.tls_args[0], "pacs.example.org")  # type: ignore[index]
    assert relaxed.send(path).ok
    assert len(peer.received) == 1


def test_destination_without_client_certificate_is_refused_by_a_verifying_peer(
    tmp_path, certs, peers
):
    """A peer that verifies callers refuses a tls destination with no certificate."""
    peer = peers(certs, certs.server, verify_clients=True)
    _, path = write(tmp_path)
    assert not tls_destination(peer, ca_certificates=str(certs.ca)).send(path).ok
    assert peer.received == []
