"""The bank's on-disk layout and its manifest.

::

    <bank>/manifest.json        entries + domain statistics (replaced atomically)
    <bank>/images/<uid>.npy     uint16 engine image (unit float x 65535, brighter = denser)
    <bank>/masks/<uid>.npy      breast mask, np.packbits of the bool mask
    <bank>/.lock                fcntl lock held by writers (add/remove)

Writers take the lock, write arrays (temp + fsync + rename) before the manifest, and
replace the manifest atomically; removals drop the entry from the manifest before the
files. Readers never lock: they read a manifest snapshot and its files.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import BankCorrupt

MANIFEST_VERSION = 1
UID_MAX = 64
# The bank names its files after SOP Instance UIDs, so a UID must be safe as a file name:
# digits and dots only (no "/", "..", leading dot or NUL), non-empty components, at most 64
# characters. Leading zeros in a component (not conformant, but seen in the wild) are
# allowed since they cannot make a path escape. pydicom's ``UID.is_valid`` is not used
# here: its ``$`` accepts a trailing newline.
_SAFE_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
UNIT_SCALE = 65535.0
HIST_BINS = 1024  # per-entry histogram of breast pixels over [0, 1]


def uid_problem(uid: str) -> str:
    """Why ``uid`` cannot name a file in the bank, or ``""`` when it can."""
    if not uid:
        return "empty SOPInstanceUID"
    if len(uid) > UID_MAX:
        return f"SOPInstanceUID is {len(uid)} characters long (a UID has at most {UID_MAX})"
    if not _SAFE_UID.fullmatch(uid):
        return f"SOPInstanceUID {uid[:80]!r} is not a valid UID (digits and dots only)"
    return ""


def file_name(uid: str) -> str:
    """``<uid>.npy``, the name of a bank file of ``uid``.

    Raises:
        BankCorrupt: ``uid`` is not a valid UID, so not safe as a file name (a path
            component could escape the bank).
    """
    problem = uid_problem(uid)
    if problem:
        raise BankCorrupt(f"{problem}: refused as a bank file name")
    return f"{uid}.npy"


@dataclass(frozen=True)
class Entry:
    """One reference image in the bank."""

    sop_instance_uid: str
    view: str
    laterality: str
    chest_wall_left: bool
    pixel_spacing_mm: tuple[float, float]
    manufacturer: str
    model: str
    bits_stored: int
    photometric: str
    rows: int
    columns: int
    breast_area_mm2: float
    background: float  # median unit value outside the breast
    histogram: tuple[int, ...]  # HIST_BINS counts of breast pixels over [0, 1]
    image_sha256: str
    source: str  # the file it was added from
    added_at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        data = dict(data)
        data["pixel_spacing_mm"] = tuple(data["pixel_spacing_mm"])
        data["histogram"] = tuple(data["histogram"])
        return cls(**data)


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...] = field(default=())
    version: int = MANIFEST_VERSION

    def find(self, sop_instance_uid: str) -> Entry | None:
        return next((e for e in self.entries if e.sop_instance_uid == sop_instance_uid), None)


class Layout:
    """Paths of one bank directory and the primitives to change it safely."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.manifest = self.root / "manifest.json"
        self.images = self.root / "images"
        self.masks = self.root / "masks"
        self.lock_path = self.root / ".lock"

    def image_path(self, uid: str) -> Path:
        """``images/<uid>.npy``; raises BankCorrupt for a UID that is not safe as a file name."""
        return self.images / file_name(uid)

    def mask_path(self, uid: str) -> Path:
        """``masks/<uid>.npy``; raises BankCorrupt for a UID that is not safe as a file name."""
        return self.masks / file_name(uid)

    def create(self) -> None:
        for path in (self.root, self.images, self.masks):
            path.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive writer lock (blocks while another admin command writes)."""
        self.create()
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def read(self) -> Manifest:
        """The current manifest (empty when the bank has none yet)."""
        try:
            data = json.loads(self.manifest.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return Manifest()
        except (OSError, ValueError) as exc:
            raise BankCorrupt(f"{self.manifest}: unreadable manifest ({exc})") from None
        if data.get("version") != MANIFEST_VERSION:
            raise BankCorrupt(
                f"{self.manifest}: manifest version {data.get('version')!r} "
                f"is not {MANIFEST_VERSION}"
            )
        try:
            return Manifest(entries=tuple(Entry.from_json(e) for e in data["entries"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BankCorrupt(f"{self.manifest}: malformed entry ({exc})") from None

    def write(self, manifest: Manifest) -> None:
        payload = {"version": manifest.version, "entries": [e.to_json() for e in manifest.entries]}
        self._atomic(self.manifest, json.dumps(payload, indent=1).encode())

    def write_arrays(
        self, uid: str, image: npt.NDArray[np.uint16], mask: npt.NDArray[np.bool_]
    ) -> None:
        self._atomic_npy(self.mask_path(uid), np.packbits(mask))
        self._atomic_npy(self.image_path(uid), image)

    def load_image(self, entry: Entry, mmap: bool = True) -> npt.NDArray[np.uint16]:
        arr: npt.NDArray[np.uint16] = np.load(
            self.image_path(entry.sop_instance_uid), mmap_mode="r" if mmap else None
        )
        if arr.shape != (entry.rows, entry.columns) or arr.dtype != np.uint16:
            raise BankCorrupt(
                f"image of {entry.sop_instance_uid} has shape {arr.shape}/{arr.dtype}, "
                f"expected {(entry.rows, entry.columns)}/uint16"
            )
        return arr

    def load_mask(self, entry: Entry) -> npt.NDArray[np.bool_]:
        packed = np.load(self.mask_path(entry.sop_instance_uid))
        count = entry.rows * entry.columns
        if packed.size != (count + 7) // 8:
            raise BankCorrupt(
                f"mask of {entry.sop_instance_uid} has {packed.size} bytes, "
                f"expected {(count + 7) // 8}"
            )
        return np.unpackbits(packed, count=count).astype(bool).reshape(entry.rows, entry.columns)

    def delete_arrays(self, uid: str) -> None:
        self.image_path(uid).unlink(missing_ok=True)
        self.mask_path(uid).unlink(missing_ok=True)

    def _atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _atomic_npy(self, path: Path, arr: npt.NDArray[Any]) -> None:
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.npy")
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
