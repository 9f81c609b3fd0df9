"""Real peers for end-to-end tests.

`mr2nst serve` as a subprocess, DCMTK's storescu/storescp/echoscu.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

DCMTK = all(shutil.which(t) for t in ("storescu", "storescp", "echoscu"))
pytestmark = pytest.mark.skipif(not DCMTK, reason="DCMTK (storescu/storescp/echoscu) not installed")
MR2NST = str(Path(sys.executable).with_name("mr2nst"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def toml_value(value: object) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


def render_toml(cfg: dict) -> str:
    lines: list[str] = []
    for section, values in cfg.items():
        if section == "routes":
            for route in values:
                lines.append("[[routes]]")
                for k, v in route.items():
                    if isinstance(v, dict):
                        v = (
                            "{ "
                            + ", ".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
                            + " }"
                        )
                        lines.append(f"{k} = {v}")
                    else:
                        lines.append(f"{k} = {toml_value(v)}")
        elif section == "destinations":
            for name, d in values.items():
                lines.append(f"[destinations.{name}]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in d.items())
        else:
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


class Serve:
    """`mr2nst serve` in a subprocess with a generated config."""

    def __init__(
        self, workdir: Path, routes: list[dict], destinations: dict[str, int], **sections: dict
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "node.toml"
        cfg = {
            "node": {
                "ae_title": "MR2NST",
                "host": "127.0.0.1",
                "port": self.port,
                "data_dir": str(workdir / "data"),
                "min_free_disk_mb": 1,
                "network_timeout_s": 10,
                **sections.pop("node", {}),
            },
            "engine": {"features": "seeded-random", **sections.pop("engine", {})},
            # One worker for every lane unless a test asks for light workers.
            "workers": {"count": 1, "light": 0, "lease_s": 2, **sections.pop("workers", {})},
            "forwarding": {
                "poll_s": 0.2,
                "backoff_initial_s": 0.3,
                "backoff_max_s": 1,
                "max_attempts": 50,
                **sections.pop("forwarding", {}),
            },
            "logging": {"format": "json", "level": "info"},
            "routes": routes,
            "destinations": {
                n: {"ae_title": n.upper(), "host": "127.0.0.1", "port": p}
                for n, p in destinations.items()
            },
            **sections,
        }
        self.config_path.write_text(render_toml(cfg))
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "serve.log"
        self.log_start = 0

    def start(self) -> Serve:
        self.log = self.log_path.open("a")
        self.log_start = self.log.tell()  # events of this run begin here (restarts append)
        self.proc = subprocess.Popen(
            [MR2NST, "serve", "--config", str(self.config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(
            lambda: echo(self.port).returncode == 0 or self.proc.poll() is not None,
            60,
            "serve to listen",
        )
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        self.log.close()
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [MR2NST, *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def queue(self) -> dict:
        out = self.cli("queue", "list", "--all", "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def events(self, this_run: bool = False) -> list[dict]:
        """The node's JSON log events (only those since the last start if ``this_run``)."""
        with self.log_path.open("rb") as fh:
            fh.seek(self.log_start if this_run else 0)
            text = fh.read().decode("utf-8", "replace")
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 60.0) -> list[dict]:
        """Wait until this run of the node has logged ``count`` events named ``name``."""
        assert self.proc is not None
        proc = self.proc

        def logged() -> list[dict] | None:
            rows = [e for e in self.events(this_run=True) if e.get("event") == name]
            if len(rows) >= count:
                return rows
            if proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:]
                raise AssertionError(f"serve exited before logging {name}:\n{tail}")
            return None

        rows: list[dict] = wait_for(logged, timeout, f"{count} {name!r} event(s)")
        return rows


class StoreSCP:
    """DCMTK storescp as a downstream AE."""

    def __init__(self, workdir: Path, ae_title: str, port: int | None = None) -> None:
        self.dir = workdir / f"recv-{ae_title.lower()}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "-od", str(self.dir), "+xa", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(
            lambda: echo(self.port, aec=self.ae_title).returncode == 0, 20, "storescp to listen"
        )
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.dir.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def echo(port: int, aet: str = "E2E", aec: str = "MR2NST") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def storescu(
    port: int,
    files: list[Path],
    aet: str = "MODALITY",
    aec: str = "MR2NST",
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "storescu",
            *(extra or []),
            "-aet",
            aet,
            "-aec",
            aec,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_ct(path: Path, rows: int = 16, cols: int = 16) -> Path:
    """A small CT image file (a non-MG instance, for forward routes)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.PatientName = "Test^CT"
    ds.PatientID = "CT-1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    pixels = (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) * 7) % 4096
    ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def worker_processes(serve: Serve) -> list:
    """The node's worker processes (spawned multiprocessing children), as psutil processes."""
    import psutil

    assert serve.proc is not None
    children = psutil.Process(serve.proc.pid).children(recursive=True)
    return [c for c in children if any("spawn_main" in part for part in c.cmdline())]
