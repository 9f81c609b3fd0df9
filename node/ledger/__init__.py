"""The ledger: one row per received instance and per delivery, the node's durable memory.

``store`` holds the operations, ``schema`` the tables and migrations, ``states`` the state
names. Everything outside this package imports from here.
"""

from mr2nst.node.ledger.states import DeliveryState, InstanceState
from mr2nst.node.ledger.store import DeliveryJob, Job, Ledger, Received

__all__ = ["DeliveryJob", "DeliveryState", "InstanceState", "Job", "Ledger", "Received"]
