"""The states an instance and a delivery move through, as stored in the ledger."""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    """Where one received instance stands."""

    RECEIVED = "received"
    PROCESSING = "processing"
    TRANSFORMED = "transformed"  # output ready; deliveries exist
    DONE = "done"  # every delivery sent
    FAILED = "failed"  # processing given up; file moved to dead/
    DROPPED = "dropped"  # a drop route matched; nothing stored
    UNROUTED = "unrouted"  # no route applied


class DeliveryState(StrEnum):
    """Where one delivery of an instance to one destination stands."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"  # the last attempt failed; another is scheduled
    DEAD = "dead"  # given up: attempts spent or permanently refused
    PURGED = "purged"
