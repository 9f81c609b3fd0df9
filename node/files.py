"""The node's one durable write: temporary file, fsync, rename into place, directory fsync."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    final: Path, writer: Callable[[BinaryIO], None], tmp_dir: Path | None = None
) -> Path:
    """Write ``final`` through ``writer`` so that it exists complete or not at all.

    Args:
        final: the path to create or replace.
        writer: writes the content to the open binary file it is given.
        tmp_dir: where the temporary file goes (same file system as ``final``; default:
            ``final``'s directory).

    Returns:
        ``final``.

    Raises:
        OSError: the write, fsync or rename failed; no temporary file is left behind.
    """
    tmp_path = (tmp_dir or final.parent) / f".{final.name}.{uuid.uuid4().hex}.part"
    try:
        with open(tmp_path, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
        fsync_dir(final.parent)
    finally:
        tmp_path.unlink(missing_ok=True)
    return final
