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
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from mr2nst.node.config import Config
from mr2nst.node.dicom.sopclasses import ACCEPTED_TRANSFER_SYNTAXES, NATIVE_TRANSFER_SYNTAXES
from mr2nst.node.errors import SpoolError
from mr2nst.node.ledger import Ledger, Received
from mr2nst.node.ledger.states import InstanceState
from mr2nst.node.logs import get_logger, instance_context
from mr2nst.node.service.prometheus import Metrics
from mr2nst.node.service.routing import Router
from mr2nst.node.service.spool import Spool

log = get_logger("mr2nst.scp")

# C-STORE statuses this node returns (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE not recognised.
REJECT_PERMANENT = 0x01
REJECT_SOURCE_SERVICE_USER = 0x01
REJECT_CALLING_AE_NOT_RECOGNISED = 0x03


@dataclass(frozen=True)
class Allowlist:
    """Calling AEs allowed to associate: "AE" (any address) or "AE@IP"; empty allows all."""

    entries: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, values: Sequence[str]) -> Allowlist:
        return cls(tuple((ae, addr) for ae, _, addr in (v.partition("@") for v in values)))

    def allows(self, ae_title: str, address: str) -> bool:
        if not self.entries:
            return True
        for ae, addr in self.entries:
            if ae == ae_title and (not addr or _same_ip(addr, address)):
                return True
        return False


def _same_ip(a: str, b: str) -> bool:
    try:
        ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return a == b
    if isinstance(ib, ipaddress.IPv6Address) and ib.ipv4_mapped is not None:
        ib = ib.ipv4_mapped
    return ia == ib


@dataclass
class StoreService:
    """Collaborators of the C-STORE handler."""

    spool: Spool
    ledger: Ledger
    router: Router
    min_free_mb: float
    allowlist: Allowlist
    metrics: Metrics | None = None


def handle_requested(event: Any, service: StoreService) -> None:
    """EVT_REQUESTED: reject callers that are not on the allowlist."""
    requestor = event.assoc.requestor
    ae_title, address = str(requestor.primitive.calling_ae_title).strip(), str(requestor.address)
    if not service.allowlist.allows(ae_title, address):
        log.warning(
            "association_rejected",
            calling_ae=ae_title,
            peer=address,
            reason="calling AE not on node.allowed_callers",
        )
        event.assoc.acse.send_reject(
            REJECT_PERMANENT, REJECT_SOURCE_SERVICE_USER, REJECT_CALLING_AE_NOT_RECOGNISED
        )
        # As pynetdicom does after its own rejections: lets the A-ASSOCIATE-RJ go out.
        event.assoc.kill()


def handle_echo(event: Any) -> int:
    """EVT_C_ECHO: always success."""
    return SUCCESS


def handle_store(event: Any, service: StoreService) -> int:
    """EVT_C_STORE: persist the dataset durably, record it in the ledger, then acknowledge."""
    started = time.perf_counter()
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    called_ae = str(event.assoc.acceptor.ae_title).strip()
    with instance_context(
        calling_ae=calling_ae, sop_uid=str(event.request.AffectedSOPInstanceUID or "")
    ):
        status, fields = _store(event, service, calling_ae, called_ae)
        if service.metrics is not None:
            service.metrics.stores.labels(status=f"0x{status:04X}").inc()
            service.metrics.store_seconds.observe(time.perf_counter() - started)
        level = "info" if status == SUCCESS else "warning"
        getattr(log, level)(
            "stage_receive",
            status=f"0x{status:04X}",
            outcome="stored" if status == SUCCESS else "refused",
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
            **fields,
        )
        return status


def _store(
    event: Any, service: StoreService, calling_ae: str, called_ae: str
) -> tuple[int, dict[str, Any]]:
    if service.spool.free_mb() < service.min_free_mb:
        return OUT_OF_RESOURCES, {"reason": "free disk below node.min_free_disk_mb"}
    try:
        ds: Dataset = event.dataset
        sop_class = str(ds.SOPClassUID)
        sop_instance = str(ds.SOPInstanceUID)
        study_uid = str(ds.get("StudyInstanceUID", ""))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
    except Exception as exc:  # edge: any parse failure of peer data is "cannot understand"
        return CANNOT_UNDERSTAND, {"reason": f"cannot decode dataset: {exc.__class__.__name__}"}
    if sop_class != str(event.context.abstract_syntax) or sop_instance != str(
        event.request.AffectedSOPInstanceUID
    ):
        return DATASET_DOES_NOT_MATCH_SOP_CLASS, {
            "reason": "SOP Class/Instance UID differ from the request"
        }
    try:
        decision = service.router.decide(ds, calling_ae, called_ae)
    except Exception as exc:  # edge: a malformed element read by a route match
        return CANNOT_UNDERSTAND, {"reason": f"cannot evaluate routes: {exc.__class__.__name__}"}
    fields: dict[str, Any] = {
        "route": decision.route,
        "action": decision.action,
        "study_uid": study_uid,
        "series_uid": series_uid,
    }
    if decision.skipped:
        fields["skipped"] = list(decision.skipped)
    path: str | None = None
    state = {"drop": InstanceState.DROPPED, "none": InstanceState.UNROUTED}.get(
        decision.action, InstanceState.RECEIVED
    )
    if state != InstanceState.DROPPED:
        try:
            path = str(service.spool.write_incoming(event.encoded_dataset(include_meta=True)))
        except SpoolError as exc:
            return OUT_OF_RESOURCES, {**fields, "reason": str(exc)}
    record = Received(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax=str(event.context.transfer_syntax),
        calling_ae=calling_ae,
        called_ae=called_ae,
        peer=str(event.assoc.requestor.address),
        route=decision.route,
        action=decision.action,
        method=decision.method,
        destinations=decision.destinations,
        state=state,
        spool_path=path,
    )
    try:
        fields["job_id"] = service.ledger.record(record)
    except Exception as exc:  # edge: the ledger is down; refuse so the peer keeps its copy
        if path:
            service.spool.discard(path)
        return OUT_OF_RESOURCES, {
            **fields,
            "reason": f"ledger unavailable: {exc.__class__.__name__}",
        }
    return SUCCESS, fields


def build_ae(config: Config) -> AE:
    """The node's application entity: every storage SOP class plus Verification."""
    ae = AE(ae_title=config.node.ae_title)
    ae.maximum_associations = config.node.max_associations
    ae.network_timeout = config.node.network_timeout_s
    ae.acse_timeout = config.node.network_timeout_s
    ae.dimse_timeout = config.node.network_timeout_s
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, NATIVE_TRANSFER_SYNTAXES[:2])
    return ae


def start_scp(
    config: Config, service: StoreService, port: int | None = None
) -> ThreadedAssociationServer:
    """Start listening (non-blocking); returns the server, whose ``server_address`` has the port."""
    ae = build_ae(config)
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [service]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [service]),
    ]
    server = ae.start_server(
        (config.node.host, config.node.port if port is None else port),
        block=False,
        evt_handlers=handlers,
    )
    assert isinstance(server, ThreadedAssociationServer)
    return server
