"""IOD checks with dicom3tools' ``dciodvfy``: the one helper the demo and the tests share."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DCIODVFY = "dciodvfy"


def dciodvfy_available() -> bool:
    """Whether dicom3tools' ``dciodvfy`` is on the PATH."""
    return shutil.which(DCIODVFY) is not None


def iod_errors(path: Path, timeout_s: float = 120.0) -> list[str]:
    """The "Error" lines ``dciodvfy`` reports for one file (an empty list: a valid IOD).

    Raises:
        FileNotFoundError: ``dciodvfy`` is not installed; callers decide whether to skip.
    """
    exe = shutil.which(DCIODVFY)
    if exe is None:
        raise FileNotFoundError(f"{DCIODVFY} (dicom3tools) is not installed")
    proc = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    return [
        line.strip()
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.startswith("Error")
    ]
