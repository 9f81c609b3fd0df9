"""The reference image bank: ingest, list, remove, verify, select, statistics.

Safe for concurrent readers (engine workers) while an admin adds or removes references:
readers use manifest snapshots and reload when the manifest changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BankCorrupt, BankError, RejectedFile
from .ingest import ingest_file
from .manifest import UNIT_SCALE, Entry, Layout, Manifest, uid_problem
from .selection import Reference, choose, needs_mirror
from .stats import DomainStats, domain_stats

Progress = Callable[[Path], None]


@dataclass
class AddReport:
    added: list[Entry] = field(default_factory=list)
    already: list[str] = field(default_factory=list)  # files whose SOP instance is in the bank
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def iter_files(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            )
        else:
            out.append(path)
    return out


class Bank:
    """One bank directory."""

    def __init__(self, root: Path | str) -> None:
        self.layout = Layout(Path(root))
        self._snapshot: tuple[int, Manifest] | None = None

    # -- reading ---------------------------------------------------------------------

    def manifest(self) -> Manifest:
        """The current manifest, re-read only when the file changed."""
        try:
            stamp = self.layout.manifest.stat().st_mtime_ns
        except FileNotFoundError:
            return Manifest()
        if self._snapshot is None or self._snapshot[0] != stamp:
            self._snapshot = (stamp, self.layout.read())
        return self._snapshot[1]

    def entries(self) -> tuple[Entry, ...]:
        return self.manifest().entries

    def stats(self) -> DomainStats:
        return domain_stats(self.entries())

    def select(
        self,
        view: str,
        laterality: str,
        area_mm2: float,
        k: int,
        *,
        chest_wall_left: bool | None = None,
        allow_fewer: bool = False,
    ) -> list[Reference]:
        """The k references for a source (see :mod:`mr2nst.bank.selection`), loaded and mirrored."""
        for attempt in range(2):
            chosen = choose(self.entries(), view, area_mm2, k, allow_fewer)
            try:
                return [self._load(e, needs_mirror(e, laterality, chest_wall_left)) for e in chosen]
            except FileNotFoundError:
                if attempt:  # removed twice under our feet: the bank is being rewritten
                    raise BankCorrupt("references disappeared while loading; retry") from None
                self._snapshot = None
        raise AssertionError("unreachable")

    def _load(self, entry: Entry, mirror: bool) -> Reference:
        image = np.asarray(self.layout.load_image(entry), dtype=np.float32) / np.float32(UNIT_SCALE)
        mask = self.layout.load_mask(entry)
        if mirror:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return Reference(entry, np.ascontiguousarray(image), np.ascontiguousarray(mask), mirror)

    # -- writing (under the writer lock) ---------------------------------------------

    def add(self, paths: Iterable[str | Path], progress: Progress | None = None) -> AddReport:
        """Ingest files or folders (recursively); each file is added whole or not at all."""
        report = AddReport()
        files = iter_files(paths)
        with self.layout.locked():
            manifest = self.layout.read()
            known = {e.sop_instance_uid for e in manifest.entries}
            for path in files:
                try:
                    item = ingest_file(path)
                except RejectedFile as exc:
                    report.rejected.append((str(path), str(exc)))
                else:
                    uid = item.entry.sop_instance_uid
                    problem = uid_problem(uid)
                    if problem:  # ingest_file checks too; never let a UID become a bad path
                        report.rejected.append((str(path), problem))
                    elif uid in known:
                        report.already.append(str(path))
                    else:
                        self.layout.write_arrays(uid, item.image, item.mask)
                        manifest = Manifest(entries=(*manifest.entries, item.entry))
                        self.layout.write(
                            manifest
                        )  # one manifest write per file: a crash loses nothing added
                        known.add(uid)
                        report.added.append(item.entry)
                if progress is not None:
                    progress(path)
        return report

    def remove(self, uid: str) -> Entry:
        """Remove one reference by SOP Instance UID."""
        with self.layout.locked():
            manifest = self.layout.read()
            entry = manifest.find(uid)
            if entry is None:
                raise BankError(f"no reference with SOP Instance UID {uid} in {self.layout.root}")
            self.layout.write(
                Manifest(entries=tuple(e for e in manifest.entries if e.sop_instance_uid != uid))
            )
            if not uid_problem(uid):  # an unsafe UID (hand-edited manifest) names no files
                self.layout.delete_arrays(uid)
        return entry

    def verify(self) -> list[str]:
        """Problems found: unreadable or inconsistent files, and files no entry owns."""
        problems: list[str] = []
        manifest = self.layout.read()
        for entry in manifest.entries:
            uid = entry.sop_instance_uid
            problem = uid_problem(uid)
            if problem:
                problems.append(f"{uid!r}: {problem}; not a safe file name")
                continue
            try:
                image = self.layout.load_image(entry, mmap=False)
                self.layout.load_mask(entry)
            except (OSError, ValueError, BankCorrupt) as exc:
                problems.append(f"{uid}: {exc}")
                continue
            if hashlib.sha256(image.tobytes()).hexdigest() != entry.image_sha256:
                problems.append(f"{uid}: image checksum differs from the manifest")
        owned = {e.sop_instance_uid for e in manifest.entries}
        for folder in (self.layout.images, self.layout.masks):
            for path in sorted(folder.glob("*.npy")) if folder.exists() else []:
                if path.stem not in owned:
                    problems.append(f"{path}: not in the manifest")
        return problems
