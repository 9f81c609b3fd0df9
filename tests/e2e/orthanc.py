"""Real Orthanc servers for end-to-end tests (Debian packages `orthanc`, `orthanc-dicomweb`).

Each server runs as a subprocess in its own session, on free loopback ports, with its own
storage folder and JSON configuration; :meth:`Orthanc.stop` ends it (and its process
group) whatever happens.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from peers import free_port, wait_for

# Debian installs the server as /usr/sbin/Orthanc, which a non-root PATH may lack.
ORTHANC = shutil.which(
    "Orthanc", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
)
#: Where Debian's orthanc-dicomweb installs the DICOMweb plugin (a symlink into /usr/lib).
DICOMWEB_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    *sorted(glob.glob("/usr/lib/orthanc/libOrthancDicomWeb.so*")),
    *sorted(glob.glob("/usr/lib/*/orthanc/libOrthancDicomWeb.so*")),
)
DICOMWEB_PLUGIN = next((p for p in DICOMWEB_CANDIDATES if os.path.exists(p)), None)


class OrthancError(AssertionError):
    """A REST call to Orthanc failed; carries the HTTP status and Orthanc's answer."""


class Orthanc:
    """One Orthanc server.

    Args:
        workdir: a folder of its own (storage, config, log).
        aet: its DICOM AE title.
        modalities: name -> (AE title, host, port) of the peers it may C-STORE / C-ECHO.
        dicomweb: load the DICOMweb plugin (served under ``/dicom-web/``).
    """

    def __init__(
        self,
        workdir: Path,
        aet: str,
        modalities: dict[str, tuple[str, str, int]],
        dicomweb: bool = False,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        config: dict[str, Any] = {
            "Name": aet,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {name: list(peer) for name, peer in modalities.items()},
            "DicomScuTimeout": 30,
            "SaveJobs": False,
            "Plugins": [],
        }
        if dicomweb:
            assert DICOMWEB_PLUGIN is not None
            config["Plugins"] = [DICOMWEB_PLUGIN]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> Orthanc:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [ORTHANC or "Orthanc", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"Orthanc {self.aet} exited:\n{self.log_tail()}")
            try:
                return bool(self.get("/system"))
            except (OSError, OrthancError):
                return False

        wait_for(up, 60, f"Orthanc {self.aet} to answer")
        return self

    def stop(self) -> None:
        """SIGTERM (Orthanc shuts down cleanly), SIGKILL to the group if it lingers."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    # --- REST -------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: bytes | None = None, content_type: str = ""
    ) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=120) as rsp:
                return bytes(rsp.read())
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500]!r}") from exc

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: object) -> Any:
        answer = self.request("POST", path, json.dumps(payload).encode(), "application/json")
        return json.loads(answer) if answer.strip() else None

    def upload(self, path: Path) -> str:
        """POST /instances: store a file as it is; returns its Orthanc id."""
        answer = json.loads(
            self.request("POST", "/instances", path.read_bytes(), "application/dicom")
        )
        return str(answer["ID"])

    def store(self, modality: str, ids: list[str]) -> Any:
        """C-STORE resources to a configured modality (synchronously)."""
        return self.post(f"/modalities/{modality}/store", {"Resources": ids, "Synchronous": True})

    def echo(self, modality: str) -> None:
        """C-ECHO a configured modality; raises OrthancError when it fails."""
        self.post(f"/modalities/{modality}/echo", {})

    def instances(self) -> list[dict[str, Any]]:
        """Every instance, with its main DICOM tags."""
        return list(self.get("/instances?expand"))

    def tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def metadata(self, instance_id: str, name: str) -> str:
        return self.request("GET", f"/instances/{instance_id}/metadata/{name}").decode()

    def file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")


def dataset_bytes(part10: bytes) -> bytes:
    """The encoded data set of a DICOM file: what follows its File Meta Information.

    A receiving SCP writes a file meta of its own (its implementation UID, the calling AE),
    so "byte-identical" compares the data set that travelled.
    """
    assert part10[128:132] == b"DICM", "not a DICOM Part 10 file"
    # (0002,0000) File Meta Information Group Length, explicit VR LE: tag, "UL", 2, value.
    assert part10[132:138] == b"\x02\x00\x00\x00UL"
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length :]
