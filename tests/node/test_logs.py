"""Tests of structured logging: JSON lines, context, pynetdicom routing, no PHI."""

import io
import json
import logging
import subprocess
import sys

import pytest
import structlog
from dicom_factory import make_mg
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from mr2nst.node.config import parse_config
from mr2nst.node.ledger import Ledger
from mr2nst.node.logs import PHI_KEYS, configure_logging, get_logger, instance_context
from mr2nst.node.service import scp
from mr2nst.node.service.routing import Router
from mr2nst.node.service.spool import Spool


@pytest.fixture
def captured():
    """This process's log output (structlog and stdlib) as JSON lines at debug level."""
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def lines(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_with_context(captured):
    """Events are JSON with the bound per-instance context keys."""
    with instance_context(job_id=7, sop_uid="1.2.3", route="r"):
        get_logger("t").info("stage_transform", outcome="ok", duration_ms=1.0)
    [event] = lines(captured)
    assert event["event"] == "stage_transform" and event["job_id"] == 7 and event["route"] == "r"
    assert event["level"] == "info" and "timestamp" in event


def test_phi_keys_are_dropped(captured):
    """A PHI-named key passed to a log call never reaches the output."""
    get_logger("t").info("oops", PatientName="Doe^Jane", PatientID="PID-12345", ok=1)
    [event] = lines(captured)
    assert event["ok"] == 1 and not PHI_KEYS & set(event)
    assert "Doe^Jane" not in captured.getvalue() and "PID-12345" not in captured.getvalue()


def test_stdlib_logging_goes_through_structlog(captured):
    """pynetdicom's stdlib loggers come out as JSON lines too."""
    logging.getLogger("pynetdicom.test").warning("from stdlib %s", "x")
    [event] = lines(captured)
    assert event["event"] == "from stdlib x" and event["logger"] == "pynetdicom.test"


def test_unknown_context_key_rejected():
    """Only the documented context keys can be bound."""
    with pytest.raises(ValueError), instance_context(patient="x"):
        pass


def test_no_phi_in_logs_of_a_real_store(tmp_path, captured):
    """A full C-STORE at debug level logs the instance but none of its PHI."""
    cfg = parse_config(
        {"node": {"host": "127.0.0.1", "data_dir": str(tmp_path), "min_free_disk_mb": 0}},
        environ={},
    )
    ledger = Ledger.open(cfg.ledger_url)
    service = scp.StoreService(
        Spool(tmp_path).create(), ledger, Router(()), 0, scp.Allowlist.parse([])
    )
    server = scp.start_scp(cfg, service, port=0)
    try:
        ds = make_mg()
        ae = AE(ae_title="MOD")
        ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="MR2NST")
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()
    finally:
        server.shutdown()
        ledger.close()
    [received] = [e for e in lines(captured) if e["event"] == "stage_receive"]
    assert received["sop_uid"] == str(ds.SOPInstanceUID) and received["outcome"] == "stored"
    out = captured.getvalue()
    for value in ("Doe^Jane", "PID-12345", "19600101", "ACC-98765"):
        assert value not in out


WARNING_SCRIPT = """
import logging, sys, warnings
import pydicom
from pydicom.dataset import Dataset
from mr2nst.node.logs import configure_logging

raw = logging.getLogger("somelib")  # a library logger with its own raw-text handler
raw.addHandler(logging.StreamHandler(sys.stderr))
configure_logging("json", "info")
ds = Dataset()
ds.SOPInstanceUID = "1.2.abc"  # pydicom (default settings) warns: invalid UI value
warnings.warn("a plain UserWarning")
raw.warning("raw library text")
logging.getLogger("pydicom").warning("pydicom logger line")
"""


def test_python_warnings_and_library_loggers_are_json(tmp_path):
    """pydicom's UserWarnings and library loggers with their own handlers log JSON lines."""
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", WARNING_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = [line for line in done.stderr.splitlines() if line.strip()]
    events = [json.loads(line) for line in out]  # every line parses as JSON
    text = " ".join(str(e.get("event")) for e in events)
    assert "1.2.abc" in text and "a plain UserWarning" in text
    assert "raw library text" in text and "pydicom logger line" in text
    assert any(e.get("logger") == "py.warnings" and e["level"] == "warning" for e in events)
    assert len(events) >= 4
