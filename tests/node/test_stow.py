"""Tests of the STOW-RS destination against a tiny local DICOMweb server (http.server)."""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import make_mg
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from mr2nst.node.config import parse_config
from mr2nst.node.errors import ConfigError
from mr2nst.node.service.destinations import SendResult, Timeouts
from mr2nst.node.service.stow import StowDestination

WAIT_S = 10.0  # upper bound for waits on the server thread; never reached when things work


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write(tmp_path: Path, ds: Dataset, name: str = "in.dcm") -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def config(destinations: dict, **sections: dict):
    return parse_config({"destinations": destinations, **sections}, environ={})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"calling_ae": "X"}, "destinations.web.calling_ae: only a dicom destination"),
        ({"token_env": "1TOKEN"}, "destinations.web.token_env: '1TOKEN' is not an environment"),
        ({"transfer_syntax": "jpeg"}, "destinations.web.transfer_syntax"),
        ({"url": "ftp://host/dicom-web"}, "destinations.web.url: a stow destination needs"),
    ],
)
def test_bad_stow_settings_are_refused_with_the_key(settings, message):
    """A stow destination's bad settings fail at load with a line naming the key."""
    with pytest.raises(ConfigError) as info:
        config({"web": {"kind": "stow", "url": "http://127.0.0.1/dicom-web", **settings}})
    assert str(info.value).startswith(message)


# --- a DICOMweb server -------------------------------------------------------------------


@dataclass
class Answer:
    status: int = 200
    body: Dataset | None = None


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes


class Web:
    """A tiny STOW-RS server: records requests, answers with ``answer``."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.answer = Answer()
        self.hold = False
        self.release = threading.Event()
        web = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                web.requests.append(Request(self.path, dict(self.headers.items()), body))
                if web.hold:
                    web.release.wait(WAIT_S)
                payload = b"" if web.answer.body is None else web.answer.body.to_json().encode()
                # A client that timed out has closed the connection: nothing to answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.send_response(web.answer.status)
                    self.send_header("Content-Type", "application/dicom+json; charset=utf-8")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def web() -> Iterator[Web]:
    """A STOW-RS server on a free loopback port."""
    server = Web()
    yield server
    server.close()


def stow(url: str, environ: dict[str, str] | None = None, **settings: object) -> StowDestination:
    cfg = config({"web": {"kind": "stow", "url": url, **settings}})
    return StowDestination(
        "web", cfg.destinations["web"], Timeouts.of(cfg.destinations["web"], cfg), environ
    )


def parts(request: Request) -> list[tuple[str, bytes]]:
    """The (content type, bytes) of each part of a multipart/related request."""
    head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.body)
    assert message.get_content_type() == "multipart/related"
    assert message.get_param("type") == "application/dicom"
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in message.iter_parts()]


def test_stow_posts_one_multipart_instance_with_bearer_token(tmp_path, web):
    """STOW-RS POSTs multipart/related application/dicom to URL/studies with the token."""
    src = make_mg()
    path = write(tmp_path, src)
    dest = stow(web.url() + "/", {"CAD_TOKEN": "s3cret"}, token_env="CAD_TOKEN")
    assert dest.send(str(path)) == SendResult(True, 0)
    [request] = web.requests
    assert request.path == "/dicom-web/studies"
    assert request.headers["Authorization"] == "Bearer s3cret"
    assert "application/dicom+json" in request.headers["Accept"]
    [(content_type, payload)] = parts(request)
    assert content_type == "application/dicom"
    got = pydicom.dcmread(io.BytesIO(payload))
    assert got.SOPInstanceUID == src.SOPInstanceUID
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_stow_honours_transfer_syntax(tmp_path, web):
    """A stow destination with j2k-lossless posts JPEG 2000 lossless, same pixels."""
    src = make_mg()
    path = write(tmp_path, src)
    assert stow(web.url(), transfer_syntax="j2k-lossless").send(str(path)).ok
    [(_, payload)] = parts(web.requests[0])
    got = pydicom.dcmread(io.BytesIO(payload))
    assert got.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(got.pixel_array, src.pixel_array)


def stow_response(sop_uid: str, failure: int | None = None, warning: int | None = None) -> Dataset:
    """A STOW-RS response body naming the instance as failed or stored (with a warning)."""
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    item.ReferencedSOPInstanceUID = sop_uid
    body = Dataset()
    if failure is not None:
        item.FailureReason = failure
        body.FailedSOPSequence = Sequence([item])
    else:
        if warning is not None:
            item.WarningReason = warning
        body.ReferencedSOPSequence = Sequence([item])
    return body


@pytest.mark.parametrize(
    ("status", "failure", "warning", "ok", "permanent", "dicom_status"),
    [
        (200, None, None, True, False, 0x0000),
        (202, None, 0xB000, True, False, 0xB000),
        (202, 0xA700, None, False, False, 0xA700),
        (202, 0xC000, None, False, True, 0xC000),
        (409, 0xA900, None, False, True, 0xA900),
        (409, 0xA700, None, False, False, 0xA700),
        (400, None, None, False, True, None),
        (404, None, None, False, True, None),
        (408, None, None, False, False, None),
        (429, None, None, False, False, None),
        (500, None, None, False, False, None),
        (503, None, None, False, False, None),
    ],
)
def test_stow_http_results_map_to_outcomes(
    tmp_path, web, status, failure, warning, ok, permanent, dicom_status
):
    """HTTP answers and the instance's failure/warning reason give sent, retryable or dead."""
    src = make_mg()
    path = write(tmp_path, src)
    body = None
    if failure is not None or warning is not None:
        body = stow_response(str(src.SOPInstanceUID), failure, warning)
    web.answer = Answer(status, body)
    result = stow(web.url()).send(str(path))
    assert (result.ok, result.permanent, result.status) == (ok, permanent, dicom_status)
    if not ok:
        assert f"HTTP {status}" in result.error


def test_stow_unauthorised_points_at_the_token(tmp_path, web):
    """A 401 is permanent and says to check token_env."""
    web.answer = Answer(401)
    result = stow(web.url()).send(str(write(tmp_path, make_mg())))
    assert result.permanent and "HTTP 401" in result.error and "token_env" in result.error


def test_stow_missing_token_variable_is_permanent(tmp_path, web):
    """A token_env that is not set is a clear permanent error; nothing is posted."""
    result = stow(web.url(), {}, token_env="CAD_TOKEN").send(str(write(tmp_path, make_mg())))
    assert not result.ok and result.permanent
    assert "environment variable CAD_TOKEN" in result.error and "not set" in result.error
    assert web.requests == []


def test_stow_refused_connection(tmp_path):
    """A closed port is 'connection refused', retryable."""
    port = closed_port()
    result = stow(f"http://127.0.0.1:{port}/dicom-web").send(str(write(tmp_path, make_mg())))
    assert not result.ok and not result.permanent
    assert (
        result.error
        == f"cannot connect to http://127.0.0.1:{port}/dicom-web/studies: connection refused"
    )


def test_stow_read_timeout_is_retryable(tmp_path, web):
    """A server that does not answer within timeout_s is a retryable failure."""
    web.hold = True
    result = stow(web.url(), timeout_s=0.5).send(str(write(tmp_path, make_mg())))
    assert not result.ok and not result.permanent
    assert result.error.startswith("no response from") and "within 0.5s" in result.error


def test_stow_unreadable_file_is_permanent(tmp_path, web):
    """A file that is not DICOM is permanent, before any request."""
    path = tmp_path / "junk.dcm"
    path.write_bytes(b"junk")
    result = stow(web.url()).send(str(path))
    assert result.permanent and "not a readable DICOM file" in result.error
    assert web.requests == []
