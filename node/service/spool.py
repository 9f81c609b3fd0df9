"""Durable files under data_dir: spool/ (as received), outbox/ (derived), dead/ (given up).

Every write goes to a temporary file in the same file system, is fsynced, renamed into
place and the directory fsynced, so a file that exists under its final name is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mr2nst.node.errors import SpoolError
from mr2nst.node.files import atomic_write


class Spool:
    """The node's file areas under ``data_dir``.

    Args:
        data_dir: the node's ``node.data_dir``.
    """

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir).resolve()
        self.tmp = self.root / "spool" / "tmp"
        self.incoming = self.root / "spool" / "in"
        self.outbox = self.root / "outbox"
        self.dead = self.root / "dead"

    def create(self) -> Spool:
        """Create the file areas that do not exist yet; returns the spool."""
        for path in (self.tmp, self.incoming, self.outbox, self.dead):
            path.mkdir(parents=True, exist_ok=True)
        return self

    def clear_tmp(self) -> int:
        """Remove half-written files left by a crash (never acknowledged). Returns the count."""
        removed = 0
        for path in self.tmp.glob("*"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def free_mb(self) -> float:
        """Free space on the file system of ``data_dir``, in MiB."""
        return shutil.disk_usage(self.root).free / (1024 * 1024)

    def write(self, directory: Path, name: str, writer: Callable[[BinaryIO], None]) -> Path:
        """Durably write ``directory/name`` through ``writer``.

        Returns:
            The final path.

        Raises:
            SpoolError: the write failed; nothing is left behind.
        """
        final = directory / name
        try:
            return atomic_write(final, writer, tmp_dir=self.tmp)
        except OSError as exc:
            raise SpoolError(f"cannot write {final}: {exc.strerror or exc}") from exc

    def write_incoming(self, data: bytes) -> Path:
        """Durably store a received instance (bytes with file meta) under a fresh name.

        Raises:
            SpoolError: the write failed; nothing is left behind.
        """

        def write_data(fh: BinaryIO) -> None:
            fh.write(data)

        return self.write(self.incoming, f"{uuid.uuid4().hex}.dcm", write_data)

    def bury(self, path: Path) -> Path:
        """Move a file that cannot be processed to dead/ for an admin to inspect."""
        target = self.dead / path.name
        try:
            os.replace(path, target)
        except OSError as exc:
            raise SpoolError(f"cannot move {path} to {self.dead}: {exc.strerror or exc}") from exc
        return target

    def discard(self, path: str | Path) -> None:
        """Remove a file that was never acknowledged."""
        Path(path).unlink(missing_ok=True)
