"""DICOM status codes: those this node's SCP returns, and how a peer's C-STORE response counts.

The categories come from :mod:`pynetdicom.status` (PS3.7 Annex C, PS3.4 B.2.3); this module
adds only the node's own decisions, written once for ``mr2nst send`` and the forwarder:

- which failures are permanent (retrying cannot help), and
- 0x0111 Duplicate SOP Instance counts as delivered: the peer already holds that SOP
  Instance, and output UIDs are deterministic, so delivery is at-least-once and a
  duplicate is the same instance.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Final

from pynetdicom.status import (
    STATUS_FAILURE,
    STATUS_SUCCESS,
    STATUS_WARNING,
    Status,
    code_to_category,
)


class StoreStatus(IntEnum):
    """The C-STORE statuses this node's SCP returns (PS3.4 B.2.3)."""

    SUCCESS = Status.SUCCESS
    #: Refused: out of resources (disk low, spool write failed, ledger unavailable).
    OUT_OF_RESOURCES = 0xA700
    #: Error: the data set does not match the SOP class of the presentation context.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: cannot understand (the data set cannot be decoded or routed).
    CANNOT_UNDERSTAND = 0xC000


class AssociateReject(IntEnum):
    """The A-ASSOCIATE-RJ fields this node sends to a caller not on the allowlist (PS3.8 9.3.4)."""

    #: Result: rejected-permanent.
    REJECTED_PERMANENT = 0x01
    #: Source: DICOM UL service-user.
    SOURCE_SERVICE_USER = 0x01
    #: Reason: calling AE title not recognised.
    CALLING_AE_NOT_RECOGNISED = 0x03


#: The peer already holds this SOP Instance (PS3.7 C.5.8): counted as delivered.
DUPLICATE_SOP_INSTANCE: Final = 0x0111
#: Failures that retrying cannot fix: refused SOP class (0x0122), not authorised (0x0124).
PERMANENT_FAILURES: Final = frozenset({0x0122, 0x0124})
#: Failure ranges that retrying cannot fix: 0xA9xx data set does not match the SOP class,
#: 0xCxxx cannot understand.
PERMANENT_FAILURE_RANGES: Final = (range(0xA900, 0xAA00), range(0xC000, 0xD000))


class Response(StrEnum):
    """How a peer's C-STORE response counts for the instance that was sent."""

    SUCCESS = "success"
    WARNING = "warning"  # stored, perhaps with coercion; or already held (0x0111)
    RETRYABLE_FAILURE = "retryable failure"  # e.g. 0xA7xx out of resources: try again later
    PERMANENT_FAILURE = "permanent failure"  # retrying cannot help

    @property
    def delivered(self) -> bool:
        """Whether the peer holds the instance: success or warning."""
        return self in (Response.SUCCESS, Response.WARNING)


def classify_store_response(status: int) -> Response:
    """Classify the Status of a peer's C-STORE response.

    Args:
        status: the (0000,0900) Status value of the C-STORE-RSP.

    Returns:
        pynetdicom's category (success, warning, failure), with 0x0111 counted as a warning
        and failures split into permanent and retryable ones. An unknown or out-of-place
        status (pending, cancel) is a retryable failure.
    """
    if status == DUPLICATE_SOP_INSTANCE:
        return Response.WARNING
    category = code_to_category(status)
    if category == STATUS_SUCCESS:
        return Response.SUCCESS
    if category == STATUS_WARNING:
        return Response.WARNING
    if category == STATUS_FAILURE and (
        status in PERMANENT_FAILURES or any(status in r for r in PERMANENT_FAILURE_RANGES)
    ):
        return Response.PERMANENT_FAILURE
    return Response.RETRYABLE_FAILURE


def format_status(status: int) -> str:
    """A status as DICOM documents write it, e.g. ``0xA700``."""
    return f"0x{status:04X}"
