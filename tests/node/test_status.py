"""Tests of the DICOM status codes: the SCP's own, and the one classification of a peer's."""

import pytest
from pynetdicom.status import STATUS_FAILURE, STATUS_SUCCESS, STORAGE_SERVICE_CLASS_STATUS

from mr2nst.node.cli.send import delivered
from mr2nst.node.dicom.status import Response, StoreStatus, classify_store_response
from mr2nst.node.service.destinations import classify


def test_scp_statuses_are_pynetdicoms_storage_statuses():
    """Every status the SCP returns is a C-STORE status of pynetdicom's table, in its category."""
    categories = {s: STORAGE_SERVICE_CLASS_STATUS[s][0] for s in StoreStatus}
    assert categories.pop(StoreStatus.SUCCESS) == STATUS_SUCCESS
    assert set(categories.values()) == {STATUS_FAILURE}


@pytest.mark.parametrize(
    ("status", "response"),
    [
        (0x0000, Response.SUCCESS),
        (0xB000, Response.WARNING),
        (0xB006, Response.WARNING),
        (0xB007, Response.WARNING),
        (0x0001, Response.WARNING),
        (0x0107, Response.WARNING),
        (0x0116, Response.WARNING),
        (0x0111, Response.WARNING),
        (0xA700, Response.RETRYABLE_FAILURE),
        (0x0110, Response.RETRYABLE_FAILURE),
        (0x0213, Response.RETRYABLE_FAILURE),
        (0xFF00, Response.RETRYABLE_FAILURE),
        (0xA900, Response.PERMANENT_FAILURE),
        (0xA9FF, Response.PERMANENT_FAILURE),
        (0xC000, Response.PERMANENT_FAILURE),
        (0xCFFF, Response.PERMANENT_FAILURE),
        (0x0122, Response.PERMANENT_FAILURE),
        (0x0124, Response.PERMANENT_FAILURE),
    ],
)
def test_classification_of_a_peer_response(status, response):
    """Each peer status falls in the documented class (docs/conformance.md 2.8)."""
    assert classify_store_response(status) is response


def test_duplicate_sop_instance_is_delivered():
    """0x0111 counts as delivered for the forwarder and for `mr2nst send` alike."""
    assert classify(0x0111).ok
    assert delivered({"path": "x.dcm", "status": 0x0111, "error": ""})


@pytest.mark.parametrize("status", [0x0000, 0x0001, 0x0111, 0xA700, 0xA900, 0xB006, 0xC211])
def test_send_and_forwarder_agree(status):
    """`mr2nst send` counts a file sent exactly when the forwarder counts a delivery sent."""
    assert delivered({"path": "x.dcm", "status": status, "error": ""}) == classify(status).ok


def test_permanent_failures_are_not_retried():
    """The forwarder gives up at once on permanent failures and retries the others."""
    assert classify(0xC000).permanent and not classify(0xA700).permanent
    assert classify(0xA700).error == "peer returned status 0xA700"
