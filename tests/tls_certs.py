"""Test certificates for DICOM TLS, made with the openssl command (EC P-256, SHA-256).

A CA; a server certificate for 127.0.0.1 and localhost (SAN) signed by it; a client
certificate signed by it; and a "wrong" certificate signed by another CA.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    """Everything a TLS test needs."""

    ca: Path  # the CA's certificate (PEM)
    server: Pair  # signed by ca, SAN 127.0.0.1 / localhost
    client: Pair  # signed by ca
    wrong: Pair  # signed by another CA (also SAN 127.0.0.1 / localhost)
    other_ca: Path


def _run(*args: str) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], check=True, capture_output=True)


def _key(path: Path) -> Path:
    _run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path))
    return path


def _ca(root: Path, name: str) -> Pair:
    key = _key(root / f"{name}.key")
    cert = root / f"{name}.pem"
    _run(
        "req", "-x509", "-new", "-key", str(key), "-sha256", "-days", "2",
        "-subj", f"/CN=mr2nst test {name}", "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return Pair(cert, key)


def _leaf(root: Path, name: str, ca: Pair, usage: str) -> Pair:
    key = _key(root / f"{name}.key")
    csr = root / f"{name}.csr"
    ext = root / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"
        f"extendedKeyUsage={usage}\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    _run("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    cert = root / f"{name}.pem"
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-sha256", "-days", "2", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return Pair(cert, key)


def make_certs(root: Path) -> Certs:
    """Generate the test PKI under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    ca = _ca(root, "ca")
    other = _ca(root, "other-ca")
    return Certs(
        ca=ca.cert,
        server=_leaf(root, "server", ca, "serverAuth"),
        client=_leaf(root, "client", ca, "clientAuth"),
        wrong=_leaf(root, "wrong", other, "serverAuth,clientAuth"),
        other_ca=other.cert,
    )
