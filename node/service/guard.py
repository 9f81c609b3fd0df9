"""Bounds on what one peer can hold of the SCP: connections, time per PDU, PDU size.

pynetdicom's acceptor reads a PDU with blocking ``recv`` calls on a socket without a
timeout, and buffers whatever length the PDU header claims. A peer that trickles bytes,
claims a huge PDU or opens many sockets could so hold association slots and memory
without bound. Three guards close this:

- :class:`GuardedServer` refuses a connection (closes it at once) when its source IP
  already holds ``node.max_associations_per_peer`` associations;
- :class:`GuardedSocket` reads each PDU under one overall deadline
  (``node.network_timeout_s``) and refuses a PDU longer than the node accepts, cutting
  the connection without buffering it.

pynetdicom offers no option for either, so the server and socket are subclassed; the
server is built with the documented :meth:`pynetdicom.ae.ApplicationEntity.make_server`.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from ssl import SSLContext
from typing import TYPE_CHECKING, Any

from pynetdicom import AE
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from mr2nst.node.logs import get_logger

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = get_logger("mr2nst.scp")

#: Whatever maximum PDU length the node advertises, a PDU up to this long is read (an
#: A-ASSOCIATE-RQ is not bound by it, and some peers overshoot); a longer claim is refused.
MIN_PDU_LIMIT = 1 << 20
# The PDU types of PS3.8 9.3 (A-ASSOCIATE-RQ ... A-ABORT): after their header, pynetdicom
# reads the PDU's body; after any other header it reads the next header.
_PDU_TYPES = frozenset(range(0x01, 0x08))


@dataclass(frozen=True)
class PeerLimits:
    """What one peer may hold of the SCP.

    Attributes:
        per_peer: associations (TCP connections) one source IP may hold at once.
        pdu_deadline_s: seconds within which one whole PDU must arrive.
        max_pdu_length: the longest PDU (after its 6-byte header) that is read.
    """

    per_peer: int
    pdu_deadline_s: float
    max_pdu_length: int


class GuardedSocket(AssociationSocket):
    """An acceptor socket that reads each PDU under a deadline and a length limit."""

    limits = PeerLimits(per_peer=1, pdu_deadline_s=60.0, max_pdu_length=MIN_PDU_LIMIT)
    _deadline = 0.0
    _expect_body = False

    def recv(self, nr_bytes: int) -> bytearray:
        """Read a PDU header (6 bytes) or the body it announced, under the PDU's deadline.

        Raises:
            OSError: the deadline passed or the body is longer than the limit; the
                connection is cut (pynetdicom reads that as the transport closing).
        """
        if not self._expect_body:  # a header: the PDU's deadline starts now
            self._deadline = time.monotonic() + self.limits.pdu_deadline_s
            data = self._read(nr_bytes)
            self._expect_body = len(data) == 6 and data[0] in _PDU_TYPES
            return data
        self._expect_body = False
        if nr_bytes > self.limits.max_pdu_length:
            raise self._cut("pdu_too_long", f"PDU claims {nr_bytes} bytes")
        return self._read(nr_bytes)

    def _read(self, nr_bytes: int) -> bytearray:
        """Read up to ``nr_bytes``, fewer if the peer closes; raises once the deadline passes."""
        sock = self.socket
        if sock is None:
            return bytearray()
        data = bytearray()
        try:
            while len(data) < nr_bytes:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise self._cut("pdu_deadline", "PDU not complete within the deadline")
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(min(4096, nr_bytes - len(data)))
                except TimeoutError:
                    continue  # the loop's deadline check cuts the connection
                if not chunk:
                    break
                data.extend(chunk)
        finally:
            with suppress(OSError):
                # Sends are bounded too (a peer that never reads cannot block a thread).
                sock.settimeout(self.limits.pdu_deadline_s)
        return data

    def _cut(self, reason: str, detail: str) -> OSError:
        """Shut the connection down at once; the error for pynetdicom to read as closed."""
        log.warning("connection_cut", peer=str(self.assoc.requestor.address), reason=detail)
        if self.socket is not None:
            with suppress(OSError):
                self.socket.shutdown(socket.SHUT_RDWR)
        # No further reads: pynetdicom closes the socket itself when the association ends.
        self._is_connected = False
        return OSError(reason)


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, with a :class:`GuardedSocket` for the association."""

    def _create_association(self) -> Association:
        """pynetdicom's acceptor, its socket made a :class:`GuardedSocket`."""
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert isinstance(self.server, GuardedServer) and sock is not None
        # pynetdicom builds its AssociationSocket here with no way to choose the class, and
        # a second socket would queue a second connection event; so the class is swapped
        # (GuardedSocket adds behaviour only, no state that __init__ would set).
        sock.__class__ = GuardedSocket
        sock.limits = self.server.limits  # type: ignore[attr-defined]  # now a GuardedSocket
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, refusing a peer that holds too many associations."""

    def __init__(self, *args: Any, limits: PeerLimits, **kwargs: Any) -> None:
        self.limits = limits
        kwargs["request_handler"] = GuardedRequestHandler
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Whether the peer at ``client_address`` may open one more association."""
        peer = str(client_address[0])
        held = sum(1 for a in self.active_associations if str(a.requestor.address) == peer)
        if held < self.limits.per_peer:
            return True
        log.warning(
            "connection_refused",
            peer=peer,
            reason=f"peer holds {held} associations (node.max_associations_per_peer)",
        )
        return False

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the association in this (the accepting) thread, as the unthreaded server does.

        Handling only creates the association and starts its thread, so this is quick; it
        makes the next :meth:`verify_request` see every association already accepted.
        """
        self.finish_request(request, client_address)


def serve(
    ae: AE,
    address: tuple[str, int],
    *,
    evt_handlers: list[EventHandlerType],
    ssl_context: SSLContext | None,
    limits: PeerLimits,
) -> GuardedServer:
    """Start a :class:`GuardedServer` in a daemon thread, as ``AE.start_server(block=False)``."""
    server = ae.make_server(
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=GuardedServer,
        limits=limits,
    )
    assert isinstance(server, GuardedServer)
    thread = threading.Thread(
        target=server.serve_forever,
        name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}",
        daemon=True,
    )
    thread.start()
    # As start_server does: the AE stops its servers on shutdown, and the server's
    # shutdown() removes itself from this list.
    ae._servers.append(server)
    return server


def pdu_limit(ae: AE) -> int:
    """The longest PDU the node reads: its advertised maximum, at least :data:`MIN_PDU_LIMIT`."""
    return max(int(ae.maximum_pdu_size), MIN_PDU_LIMIT)


__all__ = ["GuardedServer", "GuardedSocket", "PeerLimits", "pdu_limit", "serve"]
