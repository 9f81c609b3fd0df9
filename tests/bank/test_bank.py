"""Tests of the reference bank: ingest, rejection reasons, selection, statistics, safety."""

import threading
from pathlib import Path

import numpy as np
import pytest
from support import write_phantom as write

from mr2nst.bank.bank import Bank
from mr2nst.bank.errors import BankError, NotEnoughReferences


@pytest.fixture
def refs(tmp_path):
    """Eight UIH references: CC/MLO x L/R, MONOCHROME1 and 2, 12 and 14 bit."""
    folder = tmp_path / "refs"
    i = 0
    for view in ("CC", "MLO"):
        for lat in ("L", "R"):
            for photometric, bits in (("MONOCHROME1", 14), ("MONOCHROME2", 12)):
                write(
                    folder,
                    f"r{i}",
                    view=view,
                    laterality=lat,
                    seed=i,
                    photometric=photometric,
                    bits=bits,
                )
                i += 1
    return folder


def test_ingest_all_variants(tmp_path, refs):
    """Every CC/MLO, L/R, MONOCHROME1/2, 12/14-bit reference is added with its metadata."""
    bank = Bank(tmp_path / "bank")
    report = bank.add([refs])
    assert len(report.added) == 8 and not report.rejected
    entries = bank.entries()
    assert {(e.view, e.laterality) for e in entries} == {
        ("CC", "L"),
        ("CC", "R"),
        ("MLO", "L"),
        ("MLO", "R"),
    }
    assert {e.photometric for e in entries} == {"MONOCHROME1", "MONOCHROME2"}
    assert {e.bits_stored for e in entries} == {12, 14}
    for e in entries:  # the breast covers a good part of the image, in mm² from the spacing
        image_mm2 = e.rows * e.columns * e.pixel_spacing_mm[0] * e.pixel_spacing_mm[1]
        assert 0.25 * image_mm2 < e.breast_area_mm2 < image_mm2
    assert bank.verify() == []


def test_re_adding_is_a_noop(tmp_path, refs):
    """Adding the same SOP instances again adds nothing."""
    bank = Bank(tmp_path / "bank")
    bank.add([refs])
    again = bank.add([refs])
    assert not again.added and len(again.already) == 8 and len(bank.entries()) == 8


def test_rejection_reasons(tmp_path):
    """Non-MG, missing view, laterality or spacing, and corrupt files are rejected with a reason."""
    folder = tmp_path / "bad"
    write(folder, "ct", Modality="CT")
    write(folder, "noview", ViewPosition=None, ViewCodeSequence=None)
    write(folder, "nolat", ImageLaterality=None)
    write(folder, "nospacing", ImagerPixelSpacing=None, PixelSpacing=None)
    write(folder, "ml", ViewPosition="ML", ViewCodeSequence=None)
    (folder / "corrupt.dcm").write_bytes(b"\x00" * 200)
    truncated = write(folder, "truncated")
    truncated.write_bytes(truncated.read_bytes()[:-5000])
    report = Bank(tmp_path / "bank").add([folder])
    reasons = {Path(f).stem: r for f, r in report.rejected}
    assert not report.added and len(reasons) == 7
    assert "not a digital mammogram" in reasons["ct"]
    assert "no view" in reasons["noview"]
    assert "no laterality" in reasons["nolat"]
    assert "no pixel spacing" in reasons["nospacing"]
    assert "view ML" in reasons["ml"]
    assert "not a readable DICOM" in reasons["corrupt"]
    assert "cannot decode" in reasons["truncated"] or "not a readable" in reasons["truncated"]
    assert not list((tmp_path / "bank" / "images").iterdir())


def test_selection_same_view_nearest_area_mirrored(tmp_path, refs):
    """select() returns same-view references by nearest area, mirrored to the source side."""
    bank = Bank(tmp_path / "bank")
    bank.add([refs])
    cc = sorted((e for e in bank.entries() if e.view == "CC"), key=lambda e: e.breast_area_mm2)
    target = (cc[1].breast_area_mm2 + cc[2].breast_area_mm2) / 2 + 1.0  # nearer cc[2] than cc[1]
    chosen = bank.select("CC", "R", target, 3)
    by_distance = sorted(cc, key=lambda e: abs(e.breast_area_mm2 - target))
    assert [r.entry.sop_instance_uid for r in chosen] == [
        e.sop_instance_uid for e in by_distance[:3]
    ]
    for ref in chosen:
        assert ref.mirrored == (ref.entry.laterality == "L")
        cols = ref.mask.sum(axis=0)
        assert cols[-20:].sum() > cols[:20].sum()  # chest wall on the right, like a right source


def test_not_enough_references(tmp_path, refs):
    """Fewer same-view references than asked is an error unless fewer are allowed."""
    bank = Bank(tmp_path / "bank")
    bank.add([refs])
    with pytest.raises(NotEnoughReferences, match="4 CC reference"):
        bank.select("CC", "L", 5000, 5)
    assert len(bank.select("CC", "L", 5000, 5, allow_fewer=True)) == 4
    with pytest.raises(NotEnoughReferences):
        bank.select("XCCL", "L", 5000, 1, allow_fewer=True)


def test_domain_stats(tmp_path, refs):
    """Statistics pool the references: common bit depth, robust range, dark background."""
    bank = Bank(tmp_path / "bank")
    bank.add([refs])
    [twelve_bit, *_] = [e for e in bank.entries() if e.bits_stored == 12]
    bank.remove(twelve_bit.sop_instance_uid)  # 4 x 14-bit, 3 x 12-bit: 14 is the common depth
    stats = bank.stats()
    assert stats.bits_stored == 14 and 0 <= stats.low < stats.high <= 1
    assert stats.background < stats.low + 0.1 and abs(sum(stats.histogram) - 1) < 1e-6
    with pytest.raises(BankError, match="empty"):
        Bank(tmp_path / "empty").stats()


def test_remove_and_verify_detects_damage(tmp_path, refs):
    """remove() drops an entry and its files; verify() reports tampered and orphan files."""
    bank = Bank(tmp_path / "bank")
    bank.add([refs])
    first, second = bank.entries()[:2]
    bank.remove(first.sop_instance_uid)
    assert len(bank.entries()) == 7 and not bank.layout.image_path(first.sop_instance_uid).exists()
    with pytest.raises(BankError, match="no reference"):
        bank.remove(first.sop_instance_uid)
    image = bank.layout.image_path(second.sop_instance_uid)
    arr = np.load(image)
    arr[0, 0] ^= 1
    np.save(image, arr)
    (bank.layout.images / "stray.npy").write_bytes(b"x")
    problems = bank.verify()
    assert any("checksum" in p for p in problems) and any("stray" in p for p in problems)


def test_readers_see_consistent_banks_while_adding(tmp_path, refs):
    """A reader selecting while an admin adds never sees a half-added reference."""
    bank_dir = tmp_path / "bank"
    Bank(bank_dir).add([refs / "r0.dcm", refs / "r1.dcm"])
    errors: list[Exception] = []
    done = threading.Event()

    def reader():
        reader_bank = Bank(bank_dir)
        while not done.is_set():
            try:
                for ref in reader_bank.select("CC", "L", 5000, 2, allow_fewer=True):
                    assert ref.image.shape == ref.mask.shape
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    Bank(bank_dir).add([refs])
    done.set()
    thread.join()
    assert errors == [] and len(Bank(bank_dir).entries()) == 8


@pytest.mark.parametrize(
    "uid",
    [
        "../../x",
        "../x",
        "/abs/x",
        "1.2/../../x",
        "..",
        ".hidden",
        "1.2.3\nx",
        "1." * 40 + "1",  # 81 characters
        "1.2..3",
    ],
)
def test_unsafe_sop_instance_uid_is_rejected_and_writes_nothing_outside(tmp_path, uid):
    """A reference whose SOPInstanceUID is not a valid UID is rejected with the reason, and
    no file appears outside (or inside) the bank; a normal UID next to it is still added."""
    folder = tmp_path / "in"
    write(folder, "evil", SOPInstanceUID=uid)
    write(folder, "good", seed=1)
    root = tmp_path / "a" / "b" / "bank"
    root.parent.mkdir(parents=True)  # ../../x from images/ lands in tmp_path/a
    before = {p for p in tmp_path.rglob("*")}
    bank = Bank(root)
    report = bank.add([folder])
    assert [Path(f).stem for f, _ in report.rejected] == ["evil"]
    [(_, reason)] = report.rejected
    assert "SOPInstanceUID" in reason and ("not a valid UID" in reason or "at most 64" in reason)
    assert [e.source for e in report.added] == [str(folder / "good.dcm")]
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(root == p or root in p.parents for p in new), sorted(map(str, new))
    assert not (Path("/abs") / "x.npy").exists()
    good = report.added[0].sop_instance_uid
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{good}.npy"]
    assert bank.verify() == []


def test_unsafe_uids_in_remove_verify_and_layout_touch_no_path(tmp_path, refs):
    """remove with a traversal UID finds nothing and deletes nothing; a hand-edited manifest
    entry with such a UID is reported by verify, removable, and names no file."""
    import dataclasses

    from mr2nst.bank.errors import BankCorrupt
    from mr2nst.bank.manifest import Manifest

    root = tmp_path / "bank"
    bank = Bank(root)
    bank.add([refs])
    victim = tmp_path / "victim.npy"
    victim.write_bytes(b"keep")
    with pytest.raises(BankError):
        bank.remove("../victim")
    assert victim.exists()
    for bad in ("../victim", "/abs/x", "1.2/3"):
        with pytest.raises(BankCorrupt):
            bank.layout.image_path(bad)
        with pytest.raises(BankCorrupt):
            bank.layout.mask_path(bad)
    first = bank.entries()[0]
    evil = dataclasses.replace(first, sop_instance_uid="../../victim")
    with bank.layout.locked():
        bank.layout.write(Manifest(entries=(*bank.manifest().entries, evil)))
    problems = bank.verify()
    assert len(problems) == 1 and "not a valid UID" in problems[0]
    assert bank.remove("../../victim").sop_instance_uid == "../../victim"
    assert victim.exists() and bank.verify() == [] and len(bank.entries()) == 8
