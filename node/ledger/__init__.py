"""The ledger: one row per received instance and per delivery, the node's durable memory.

``store`` holds the operations (``outgoing`` those of deliveries and the attempt history,
``admin`` those of ``mr2nst queue`` and cleanup), ``records`` what goes in and comes out,
``schema`` the tables and migrations, ``states`` the state names. Everything outside this
package imports from here."""

from mr2nst.node.ledger.records import (
    LIGHT_LANES,
    WORKER_LANES,
    Clock,
    DeliveryJob,
    Job,
    Lane,
    Payload,
    Received,
    lane_of,
)
from mr2nst.node.ledger.states import DeliveryState, InstanceState
from mr2nst.node.ledger.store import Ledger

__all__ = [
    "LIGHT_LANES",
    "WORKER_LANES",
    "Clock",
    "DeliveryJob",
    "DeliveryState",
    "InstanceState",
    "Job",
    "Lane",
    "Ledger",
    "Payload",
    "Received",
    "lane_of",
]
