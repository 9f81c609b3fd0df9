"""The DICOMweb STOW-RS destination (``kind = "stow"``), with dicomweb-client.

Each send POSTs one instance as ``multipart/related; type="application/dicom"`` to
``URL/studies`` (PS3.18 10.5), in the destination's ``transfer_syntax``, with an
``Authorization: Bearer`` header when ``token_env`` names an environment variable (read at
send time, so a rotated token needs no restart). The forwarder owns retries, so
dicomweb-client's own retrying is switched off.

How the HTTP answer counts:

- 200: sent.
- 202 (stored in part): the response's Failed SOP Sequence and Referenced SOP Sequence
  say what became of the instance; a Failure Reason is classified like the same C-STORE
  status (0xA7xx retryable, 0xA9xx / 0xCxxx / 0x0122 / 0x0124 permanent), a Warning
  Reason counts as delivered.
- 409 (nothing stored): classified by the instance's Failure Reason when the body gives
  one, else permanent.
- 408, 429, 5xx and connection errors: retryable. Other 4xx: permanent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from mr2nst.node.config import Config
from mr2nst.node.config import Destination as DestinationConfig
from mr2nst.node.dicom.status import Response, classify_store_response, format_status
from mr2nst.node.service.destinations import (
    AssociationLimit,
    SendResult,
    Timeouts,
    read_for_sending,
)

#: HTTP statuses worth retrying besides 5xx: Request Timeout, Too Many Requests.
RETRYABLE_HTTP = frozenset({408, 429})
#: Bodies up to this size go in one request with a Content-Length (no chunked transfer
#: encoding, which some servers and proxies refuse); the body is in memory either way.
SINGLE_REQUEST_BYTES = 1 << 40


class StowDestination:
    """Sends one file per request with STOW-RS.

    Args:
        name: the destination's name in the config.
        cfg: its ``[destinations.NAME]`` section (``url``, ``token_env``, ...).
        timeouts: connection and response timeouts.
        environ: where the bearer token is looked up (default: the process environment).
    """

    def __init__(
        self,
        name: str,
        cfg: DestinationConfig,
        timeouts: Timeouts,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.url = cfg.url.rstrip("/")
        self.timeouts = timeouts
        self.environ = os.environ if environ is None else environ
        self.limit = AssociationLimit(cfg.max_associations)

    @classmethod
    def from_config(cls, name: str, cfg: DestinationConfig, config: Config) -> StowDestination:
        """Build it from the config (timeouts of 0 mean ``node.network_timeout_s``)."""
        return cls(name, cfg, Timeouts.of(cfg, config))

    @property
    def where(self) -> str:
        """The STOW-RS endpoint, for messages."""
        return f"{self.url}/studies"

    def send(self, path: str) -> SendResult:
        """POST the file at ``path``; never raises for the server's refusal or the network.

        A file that is not readable DICOM or cannot be transcoded, and a ``token_env`` that
        is not set, are permanent failures.
        """
        headers = {"Accept": "application/dicom+json"}
        if self.cfg.token_env:
            token = self.environ.get(self.cfg.token_env, "")
            if not token:
                return SendResult(
                    False,
                    None,
                    True,
                    f"environment variable {self.cfg.token_env} (token_env of destination "
                    f"{self.name!r}) is not set",
                )
            headers["Authorization"] = f"Bearer {token}"
        ds = read_for_sending(path, self.cfg.transfer_syntax)
        if isinstance(ds, SendResult):
            return ds
        with self.limit.slot():
            return self._post(ds, headers)

    def _post(self, ds: Dataset, headers: dict[str, str]) -> SendResult:
        """One STOW-RS request for ``ds``, its answer classified."""
        answers: list[requests.Response] = []

        def keep(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
            answers.append(response)
            return response

        with requests.Session() as session:
            try:
                client = DICOMwebClient(
                    self.url,
                    session=session,
                    headers=headers,
                    callback=keep,
                    chunk_size=SINGLE_REQUEST_BYTES,
                    timeout=(self.timeouts.connect_s, self.timeouts.response_s),
                )
            except ValueError as exc:  # a URL it cannot use
                return SendResult(False, None, True, f"STOW-RS url {self.url!r}: {exc}")
            client.set_http_retry_params(retry=False)
            try:
                client.store_instances([ds])
            except requests.HTTPError:
                pass  # classified from the kept response below
            except requests.ConnectTimeout:
                return SendResult(
                    False,
                    None,
                    False,
                    f"cannot connect to {self.where}: connection timed out after "
                    f"{self.timeouts.connect_s:g}s",
                )
            except requests.Timeout:
                return SendResult(
                    False,
                    None,
                    False,
                    f"no response from {self.where} within {self.timeouts.response_s:g}s",
                )
            except requests.ConnectionError as exc:
                return SendResult(
                    False, None, False, f"cannot connect to {self.where}: {connection_error(exc)}"
                )
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as exc:
                return SendResult(False, None, True, f"STOW-RS url {self.url!r}: {exc}")
            except requests.RequestException as exc:
                return SendResult(
                    False, None, False, f"STOW-RS to {self.where}: {exc.__class__.__name__}"
                )
            except ValueError:
                pass  # a body dicomweb-client cannot read: the status line still counts
        if not answers:
            return SendResult(False, None, False, f"no response from {self.where}")
        return http_result(answers[-1], str(ds.SOPInstanceUID), self.where)


def connection_error(exc: BaseException) -> str:
    """Why a connection failed, said plainly ("connection refused"), from requests' and
    urllib3's chain of wrapped exceptions."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, socket.gaierror):
            return f"cannot resolve host ({item.strerror or item})"
        if isinstance(item, ConnectionResetError):
            return "connection reset by the peer"
        todo.extend([*item.args, item.__cause__, item.__context__, getattr(item, "reason", None)])
    return exc.__class__.__name__


def response_dataset(response: requests.Response) -> Dataset | None:
    """The STOW-RS response body as a data set (DICOM JSON), or None if it has none."""
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type not in ("application/dicom+json", "application/json") or not response.content:
        return None
    try:
        return Dataset.from_json(response.text)
    except (ValueError, TypeError, KeyError):
        return None


def instance_reasons(body: Dataset | None, sop_uid: str) -> tuple[bool, int | None, int | None]:
    """What the response says of the instance ``sop_uid``.

    Returns:
        (listed as failed, its Failure Reason, its Warning Reason); reasons may be None.
    """
    if body is None:
        return False, None, None
    for item in body.get("FailedSOPSequence", None) or []:
        uid = item.get("ReferencedSOPInstanceUID", None)
        if uid is None or str(uid) == sop_uid:
            reason = item.get("FailureReason", None)
            return True, None if reason is None else int(reason), None
    for item in body.get("ReferencedSOPSequence", None) or []:
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid:
            reason = item.get("WarningReason", None)
            return False, None, None if reason is None else int(reason)
    return False, None, None


def http_result(response: requests.Response, sop_uid: str, where: str) -> SendResult:
    """Classify a STOW-RS answer for the one instance that was sent (module docstring)."""
    code = response.status_code
    said = f"{where} answered HTTP {code} {response.reason or ''}".rstrip()
    failed, failure, warning = instance_reasons(response_dataset(response), sop_uid)
    if code in (202, 409) and failed:
        if failure is None:
            return SendResult(False, None, code == 409, f"{said}: the instance failed")
        permanent = classify_store_response(failure) is not Response.RETRYABLE_FAILURE
        return SendResult(
            False, failure, permanent, f"{said}: failure reason {format_status(failure)}"
        )
    if 200 <= code < 300:
        return SendResult(True, 0x0000 if warning is None else warning)
    if code in RETRYABLE_HTTP or code >= 500:
        return SendResult(False, None, False, said)
    if code in (401, 403):
        return SendResult(False, None, True, f"{said}: check the destination's token_env")
    return SendResult(False, None, True, said)
