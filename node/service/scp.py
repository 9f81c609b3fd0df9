"""The C-STORE / C-ECHO SCP: persist, record, acknowledge.

Handlers are thin (pynetdicom's app style): they get their collaborators through
``evt_handlers`` args, never run the model, and return named status constants. A
C-STORE is acknowledged with Success only after the file is fsynced and renamed into
``spool/in`` and its ledger row is committed.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import
from pynetdicom.transport import ThreadedAssociationServer

from mr2nst.node.config import Config
from mr2nst.node.dicom.sopclasses import ACCEPTED_TRANSFER_SYNTAXES, NATIVE_TRANSFER_SYNTAXES
from mr2nst.node.dicom.status import AssociateReject, StoreStatus, format_status
from mr2nst.node.dicom.validate import (
    UnreadableDataset,
    check_dataset,
    encoding_mismatch,
    oversize,
)
from mr2nst.node.errors import SpoolError
from mr2nst.node.ledger import Ledger, Received, lane_of
from mr2nst.node.ledger.records import state_of_action
from mr2nst.node.ledger.states import InstanceState
from mr2nst.node.logs import get_logger, instance_context
from mr2nst.node.service.guard import PeerLimits, pdu_limit, serve
from mr2nst.node.service.prometheus import Metrics
from mr2nst.node.service.routing import Decision, Router
from mr2nst.node.service.spool import Spool
from mr2nst.node.service.tls import server_context

log = get_logger("mr2nst.scp")

# The C-STORE statuses this node returns, by name (pynetdicom's apps are the model).
SUCCESS = StoreStatus.SUCCESS
OUT_OF_RESOURCES = StoreStatus.OUT_OF_RESOURCES
DATASET_DOES_NOT_MATCH_SOP_CLASS = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
CANNOT_UNDERSTAND = StoreStatus.CANNOT_UNDERSTAND


@dataclass(frozen=True)
class Allowlist:
    """Calling AEs allowed to associate: "AE" (any address) or "AE@IP"; empty allows all."""

    entries: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, values: Sequence[str]) -> Allowlist:
        """The allowlist of ``node.allowed_callers`` entries ("AE" or "AE@IP")."""
        return cls(tuple((ae, addr) for ae, _, addr in (v.partition("@") for v in values)))

    def allows(self, ae_title: str, address: str) -> bool:
        """Whether ``ae_title`` calling from ``address`` may associate."""
        if not self.entries:
            return True
        for ae, addr in self.entries:
            if ae == ae_title and (not addr or _same_ip(addr, address)):
                return True
        return False


def _same_ip(a: str, b: str) -> bool:
    """Whether two addresses are the same IP (an IPv4-mapped IPv6 peer counts as IPv4)."""
    try:
        ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return a == b
    if isinstance(ib, ipaddress.IPv6Address) and ib.ipv4_mapped is not None:
        ib = ib.ipv4_mapped
    return ia == ib


@dataclass
class StoreService:
    """Collaborators of the C-STORE handler, passed through ``evt_handlers`` args.

    Attributes:
        spool: where received data sets are written durably.
        ledger: where each received instance is recorded.
        router: decides each instance's route.
        min_free_mb: below this much free disk under ``data_dir``, stores are refused.
        allowlist: the calling AEs allowed to associate.
        metrics: the serving process's Prometheus metrics, if any.
        max_dataset_bytes: larger data sets (inflated) are refused 0xA700.
    """

    spool: Spool
    ledger: Ledger
    router: Router
    min_free_mb: float
    allowlist: Allowlist
    metrics: Metrics | None = None
    max_dataset_bytes: int = 256 << 20


@dataclass(frozen=True)
class _Arrival:
    """What one C-STORE request says about its instance and its sender."""

    dataset: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    peer: str


Fields = dict[str, object]


def handle_requested(event: Event, service: StoreService) -> None:
    """Handle EVT_REQUESTED: reject a caller that is not on the allowlist.

    Args:
        event: the A-ASSOCIATE-RQ event.
        service: the handler's collaborators (only its allowlist is read).
    """
    requestor = event.assoc.requestor
    primitive = requestor.primitive  # the A-ASSOCIATE-RQ, set before this event
    ae_title = str(primitive.calling_ae_title).strip() if primitive is not None else ""
    address = str(requestor.address)
    if not service.allowlist.allows(ae_title, address):
        log.warning(
            "association_rejected",
            calling_ae=ae_title,
            peer=address,
            reason="calling AE not on node.allowed_callers",
        )
        event.assoc.acse.send_reject(
            AssociateReject.REJECTED_PERMANENT,
            AssociateReject.SOURCE_SERVICE_USER,
            AssociateReject.CALLING_AE_NOT_RECOGNISED,
        )
        # As pynetdicom does after its own rejections: lets the A-ASSOCIATE-RJ go out.
        event.assoc.kill()


def handle_echo(event: Event, service: StoreService) -> int:
    """Handle EVT_C_ECHO: count it, log it (calling AE and peer) at info, answer Success.

    Args:
        event: the C-ECHO request event.
        service: the handlers' collaborators (only its metrics are used).

    Returns:
        Success, always.
    """
    if service.metrics is not None:
        service.metrics.echoes.inc()
    log.info(
        "c_echo",
        calling_ae=str(event.assoc.requestor.ae_title).strip(),
        called_ae=str(event.assoc.acceptor.ae_title).strip(),
        peer=str(event.assoc.requestor.address),
        status=format_status(SUCCESS),
    )
    return SUCCESS


def handle_store(event: Event, service: StoreService) -> int:
    """Handle EVT_C_STORE: persist the data set durably, record it, then acknowledge.

    Args:
        event: the C-STORE request event.
        service: the handler's collaborators.

    Returns:
        Success only once the file is fsynced in ``spool/in`` and its ledger row is
        committed; otherwise the specific failure status, with the reason logged.
    """
    started = time.perf_counter()
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    called_ae = str(event.assoc.acceptor.ae_title).strip()
    with instance_context(
        calling_ae=calling_ae, sop_uid=str(_request(event).AffectedSOPInstanceUID or "")
    ):
        status, fields = _store(event, service, calling_ae, called_ae)
        if service.metrics is not None:
            service.metrics.stores.labels(status=format_status(status)).inc()
            service.metrics.store_seconds.observe(time.perf_counter() - started)
        emit = log.info if status == SUCCESS else log.warning
        outcome = "stored" if status == SUCCESS else "refused"
        if status == SUCCESS and fields.get("action") == "drop":
            outcome = "dropped"
        emit(
            "stage_receive",
            status=format_status(status),
            outcome=outcome,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
            **fields,
        )
        return status


def _request(event: Event) -> C_STORE:
    """The request of an EVT_C_STORE event (pynetdicom sets a C-STORE primitive for it)."""
    return cast(C_STORE, event.request)


def _store(
    event: Event, service: StoreService, calling_ae: str, called_ae: str
) -> tuple[StoreStatus, Fields]:
    """Check, route and persist one C-STORE; the status to return and the fields to log."""
    if service.spool.free_mb() < service.min_free_mb:
        return OUT_OF_RESOURCES, {"reason": "free disk below node.min_free_disk_mb"}
    encoded = _request(event).DataSet
    if encoded is not None:
        too_large = oversize(
            encoded.getbuffer(), str(event.context.transfer_syntax), service.max_dataset_bytes
        )
        if too_large:
            return OUT_OF_RESOURCES, {"reason": too_large}
        mismatch = encoding_mismatch(encoded.getbuffer()[:8], str(event.context.transfer_syntax))
        if mismatch:
            return CANNOT_UNDERSTAND, {"reason": mismatch}
    try:
        arrival = _arrival(event, calling_ae, called_ae)
    except Exception as exc:  # edge: any parse failure of peer data is "cannot understand"
        return CANNOT_UNDERSTAND, {"reason": f"cannot decode dataset: {exc.__class__.__name__}"}
    if arrival.sop_class_uid != str(
        event.context.abstract_syntax
    ) or arrival.sop_instance_uid != str(_request(event).AffectedSOPInstanceUID):
        return DATASET_DOES_NOT_MATCH_SOP_CLASS, {
            "reason": "SOP Class/Instance UID differ from the request"
        }
    try:
        check_dataset(arrival.dataset, arrival.transfer_syntax)
    except UnreadableDataset as exc:
        return CANNOT_UNDERSTAND, {"reason": str(exc)}
    try:
        decision = service.router.decide(arrival.dataset, calling_ae, called_ae)
    except Exception as exc:  # edge: a malformed element read by a route match
        return CANNOT_UNDERSTAND, {"reason": f"cannot evaluate routes: {exc.__class__.__name__}"}
    fields: Fields = {
        "route": decision.route,
        "action": decision.action,
        "lane": lane_of(decision.action, decision.method),
        "study_uid": arrival.study_uid,
        "series_uid": arrival.series_uid,
    }
    if decision.skipped:
        fields["skipped"] = list(decision.skipped)
    return _persist(event, service, arrival, decision, fields)


def _arrival(event: Event, calling_ae: str, called_ae: str) -> _Arrival:
    """Read the instance's identity from the request (raises on undecodable peer data)."""
    ds = event.dataset
    return _Arrival(
        dataset=ds,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        transfer_syntax=str(event.context.transfer_syntax),
        calling_ae=calling_ae,
        called_ae=called_ae,
        peer=str(event.assoc.requestor.address),
    )


def _persist(
    event: Event, service: StoreService, arrival: _Arrival, decision: Decision, fields: Fields
) -> tuple[StoreStatus, Fields]:
    """Write the file (unless dropped) and commit its ledger row; remove the file on failure."""
    state = state_of_action(decision.action)
    path: str | None = None
    if state != InstanceState.DROPPED:
        try:
            path = str(service.spool.write_incoming(event.encoded_dataset(include_meta=True)))
        except SpoolError as exc:
            return OUT_OF_RESOURCES, {**fields, "reason": str(exc)}
    record = Received(
        sop_class_uid=arrival.sop_class_uid,
        sop_instance_uid=arrival.sop_instance_uid,
        study_uid=arrival.study_uid,
        series_uid=arrival.series_uid,
        transfer_syntax=arrival.transfer_syntax,
        calling_ae=arrival.calling_ae,
        called_ae=arrival.called_ae,
        peer=arrival.peer,
        route=decision.route,
        action=decision.action,
        method=decision.method,
        destinations=decision.destinations,
        state=state,
        spool_path=path,
        priority=decision.priority,
        fallback_destinations=decision.fallback,
        forward_original=decision.forward_original,
    )
    try:
        job_id = service.ledger.record(record)
    except Exception as exc:  # edge: the ledger is down; refuse so the peer keeps its copy
        if path:
            service.spool.discard(path)
        return OUT_OF_RESOURCES, {
            **fields,
            "reason": f"ledger unavailable: {exc.__class__.__name__}",
        }
    return SUCCESS, {**fields, "job_id": job_id}


def build_ae(config: Config) -> AE:
    """The node's application entity: every storage SOP class plus Verification.

    Args:
        config: the node's configuration (AE title, association limit, timeouts).
    """
    ae = AE(ae_title=config.node.ae_title)
    ae.maximum_associations = config.node.max_associations
    ae.network_timeout = config.node.network_timeout_s
    ae.acse_timeout = config.node.network_timeout_s
    ae.dimse_timeout = config.node.network_timeout_s
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, NATIVE_TRANSFER_SYNTAXES[:2])
    return ae


def start_scp(
    config: Config, service: StoreService, port: int | None = None, tls: bool | None = None
) -> ThreadedAssociationServer:
    """Start listening without blocking.

    Args:
        config: the node's configuration.
        service: the C-STORE handler's collaborators.
        port: listen here instead of ``node.port`` (0: an ephemeral port, for tests).
        tls: speak TLS only (``[tls]``'s certificate); None: as ``tls.require`` says.

    Returns:
        The running server; ``server_address`` has the port.
    """
    ae = build_ae(config)
    handlers: list[EventHandlerType] = [
        (evt.EVT_REQUESTED, handle_requested, [service]),
        (evt.EVT_C_ECHO, handle_echo, [service]),
        (evt.EVT_C_STORE, handle_store, [service]),
    ]
    use_tls = config.tls.require if tls is None else tls
    # Bounded per peer and per PDU (node/service/guard.py says why pynetdicom needs help).
    return serve(
        ae,
        (config.node.host, config.node.port if port is None else port),
        evt_handlers=handlers,
        ssl_context=server_context(config.tls, config.node.network_timeout_s) if use_tls else None,
        limits=PeerLimits(
            per_peer=config.node.max_associations_per_peer,
            pdu_deadline_s=config.node.network_timeout_s,
            max_pdu_length=pdu_limit(ae),
        ),
    )
