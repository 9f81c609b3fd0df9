"""DICOM TLS end to end: DCMTK storescu/storescp (+tls) against `mr2nst serve`."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
from peers import MR2NST, Serve, free_port, render_toml, storescu, wait_for, write_ct
from tls_certs import OPENSSL, Certs, Pair, make_certs

pytestmark = [pytest.mark.e2e]


def _dcmtk_has_tls() -> bool:
    try:
        out = subprocess.run(["storescu", "--help"], capture_output=True, text=True, timeout=10)
    except OSError:
        return False
    return "+tls" in out.stdout + out.stderr


if OPENSSL is None or not _dcmtk_has_tls():
    pytest.skip("DCMTK without TLS support, or no openssl command", allow_module_level=True)

FORWARD_CT = {
    "name": "ct",
    "match": {"Modality": "CT"},
    "action": "forward",
    "destinations": ["cad"],
}


def tls_opts(pair: Pair, ca: Path) -> list[str]:
    """DCMTK's options for TLS with a key and certificate, trusting ``ca``."""
    return ["+tls", str(pair.key), str(pair.cert), "-pw", "+cf", str(ca)]


def echoscu(port: int, extra: list[str], aec: str = "MR2NST") -> int:
    out = subprocess.run(
        ["echoscu", *extra, "-aet", "E2E", "-aec", aec, "127.0.0.1", str(port)],
        capture_output=True,
        timeout=30,
    )
    return out.returncode


class TlsStoreSCP:
    """DCMTK storescp speaking TLS only; it requires a client certificate from our CA."""

    def __init__(self, workdir: Path, certs: Certs) -> None:
        self.dir = workdir / "recv-cad"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.certs = certs
        self.proc = subprocess.Popen(
            [
                "storescp",
                *tls_opts(certs.server, certs.ca),
                "-aet",
                "CAD",
                "-od",
                str(self.dir),
                "+xa",
                str(self.port),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        opts = tls_opts(certs.client, certs.ca)
        wait_for(lambda: echoscu(self.port, opts, aec="CAD") == 0, 20, "storescp +tls")

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    """The test PKI: a CA, server, client and wrong certificates."""
    return make_certs(tmp_path_factory.mktemp("pki"))


def tls_node(tmp_path: Path, certs: Certs, cad: TlsStoreSCP, tls: dict) -> Serve:
    """`mr2nst serve` with [tls] and a TLS destination `cad` (client certificate, our CA)."""
    node = Serve(tmp_path, [FORWARD_CT], {"cad": cad.port})
    cfg = tomllib.loads(node.config_path.read_text())
    cfg["destinations"]["cad"].update(
        tls=True,
        ca_certificates=str(certs.ca),
        certificate=str(certs.client.cert),
        private_key=str(certs.client.key),
    )
    cfg["tls"] = {
        "certificate": str(certs.server.cert),
        "private_key": str(certs.server.key),
        "ca_certificates": str(certs.ca),
        "verify_clients": True,
        **tls,
    }
    node.config_path.write_text(render_toml(cfg))
    return node


def test_tls_port_beside_plaintext_and_tls_forwarding(tmp_path, certs, cleanup):
    """storescu +tls into tls.port and plain into node.port; both forwarded over TLS."""
    cad = TlsStoreSCP(tmp_path, certs)
    cleanup(cad)
    tls_port = free_port()
    node = tls_node(tmp_path, certs, cad, {"port": tls_port})
    cleanup(node.start())  # waits for a plaintext echo on node.port
    good = tls_opts(certs.client, certs.ca)
    plain = storescu(node.port, [write_ct(tmp_path / "in" / "plain.dcm")])
    assert plain.returncode == 0, plain.stderr
    secure = storescu(tls_port, [write_ct(tmp_path / "in" / "tls.dcm")], extra=good)
    assert secure.returncode == 0, secure.stderr
    wait_for(lambda: len(cad.files()) == 2, 60, "both instances at the TLS storescp")
    # Refused on the TLS port: a plaintext caller, a caller with a certificate from another
    # CA, and one without a certificate (anonymous TLS).
    assert echoscu(tls_port, []) != 0
    assert echoscu(tls_port, tls_opts(certs.wrong, certs.ca)) != 0
    assert echoscu(tls_port, ["+tla", "+cf", str(certs.ca)]) != 0
    assert echoscu(tls_port, good) == 0
    assert node.proc is not None and node.proc.poll() is None


def test_tls_required_on_node_port(tmp_path, certs, cleanup):
    """With tls.require, node.port speaks TLS only: plaintext storescu is refused."""
    cad = TlsStoreSCP(tmp_path, certs)
    cleanup(cad)
    node = tls_node(tmp_path, certs, cad, {"require": True})
    good = tls_opts(certs.client, certs.ca)
    # Serve.start waits for a plaintext echo, which a TLS-only port never answers.
    node.start = lambda: _start_tls(node, good)  # type: ignore[method-assign]
    cleanup(node.start())
    assert storescu(node.port, [write_ct(tmp_path / "in" / "plain.dcm")]).returncode != 0
    assert storescu(node.port, [write_ct(tmp_path / "in" / "x.dcm")], extra=good).returncode == 0
    wait_for(lambda: len(cad.files()) == 1, 60, "the TLS instance at the TLS storescp")
    assert node.queue()["counts"].get("done") == 1


def _start_tls(node: Serve, opts: list[str]) -> Serve:
    node.log = node.log_path.open("a")
    node.log_start = node.log.tell()
    node.proc = subprocess.Popen(
        [MR2NST, "serve", "--config", str(node.config_path)],
        stdout=node.log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc = node.proc
    wait_for(lambda: echoscu(node.port, opts) == 0 or proc.poll() is not None, 60, "serve over TLS")
    assert proc.poll() is None, node.log_path.read_text()[-3000:]
    return node
