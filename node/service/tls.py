"""DICOM TLS: the :class:`ssl.SSLContext` objects the SCP and the C-STORE SCU use.

Both sides speak TLS 1.2 or later with the ``ssl`` module's default (secure) ciphers.

- The SCP (``[tls]``): the node's certificate and key; with ``verify_clients`` a caller must
  present a certificate that verifies against ``ca_certificates``. The handshake runs in
  the association's thread, bounded by ``node.network_timeout_s``: a caller that connects
  and stays silent, or speaks plaintext, is disconnected and holds up no other caller.
- A destination (``tls = true``): the peer's certificate is verified against
  ``ca_certificates`` (default: the system's trust store) and, unless
  ``tls_verify_hostname`` is false, must name the destination's host; an optional client
  certificate and key authenticate this node.

The files were checked at config load (:func:`mr2nst.node.config.check_pem_files`).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from mr2nst.node.config import Destination, TlsSection

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
#: Default bound (seconds) on each read of an incoming TLS connection, handshake included.
DEFAULT_TIMEOUT_S = 60.0


class ServerContext(ssl.SSLContext):
    """An SSLContext whose server sockets do the handshake in the association's thread.

    pynetdicom wraps each accepted socket in its accepting thread; a handshake there would
    let one silent caller stall every other caller. Here the handshake is deferred to the
    first read (in the association's own thread) and each read, the handshake included,
    is bounded by ``timeout_s``.
    """

    timeout_s: float = DEFAULT_TIMEOUT_S

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        """Wrap ``sock`` for TLS; the handshake happens on the first read or write."""
        sock.settimeout(self.timeout_s)
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def server_context(tls: TlsSection, timeout_s: float = DEFAULT_TIMEOUT_S) -> ssl.SSLContext:
    """The SCP's context: the node's certificate, TLS 1.2+, client certificates if asked.

    Args:
        tls: the ``[tls]`` section (certificate and private_key set).
        timeout_s: the longest one read (the handshake included) may wait.

    Raises:
        ssl.SSLError, OSError: a file cannot be loaded (checked at config load already).
    """
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.timeout_s = timeout_s
    context.minimum_version = MINIMUM_VERSION
    context.options |= ssl.OP_NO_COMPRESSION
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates:
        context.load_verify_locations(cafile=tls.ca_certificates)
    context.verify_mode = ssl.CERT_REQUIRED if tls.verify_clients else ssl.CERT_NONE
    return context


def client_context(cfg: Destination) -> ssl.SSLContext:
    """A destination's context: verifies the peer (CA and host name), TLS 1.2+.

    Args:
        cfg: the destination's section (``tls = true``).

    Raises:
        ssl.SSLError, OSError: a file cannot be loaded (checked at config load already).
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=cfg.ca_certificates or None
    )
    context.minimum_version = MINIMUM_VERSION
    context.check_hostname = cfg.tls_verify_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if cfg.certificate:
        context.load_cert_chain(cfg.certificate, cfg.private_key)
    return context


def client_tls_args(cfg: Destination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for a destination: (context, the host to verify), or None."""
    if not cfg.tls:
        return None
    return client_context(cfg), cfg.host
