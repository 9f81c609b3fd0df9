"""Tests of the phantom DICOM writer (mr2nst.node.lab.phantom_io and .phantom_dicom)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless
from support import needs_dciodvfy

from mr2nst.core.intensity import StoredRange
from mr2nst.core.lab.phantom import PhantomCase, make_case
from mr2nst.node.dicom.iod import iod_errors
from mr2nst.node.lab.phantom_dicom import MG_FOR_PRESENTATION, phantom_dataset
from mr2nst.node.lab.phantom_io import case_spec, run_phantom_command, write_phantom_set

SIZE = (256, 208)


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A written set of 4 paired cases (seed 5); returns (folder, DICOM files)."""
    out = tmp_path_factory.mktemp("phantom")
    return out, write_phantom_set(out, 4, size=SIZE, seed=5)


@pytest.fixture(scope="module")
def case() -> PhantomCase:
    """Case 0 of the set with seed 1."""
    return make_case(case_spec(0, seed=1, size=SIZE))


def test_set_is_written_and_paired(phantom_set: tuple[Path, list[Path]]) -> None:
    """Each case has a GE file, a UIH file of the same geometry, a mask and a JSON truth file."""
    out, paths = phantom_set
    assert len(paths) == 8
    for i in range(4):
        ge_path, uih_path = out / "ge" / f"case{i:04d}.dcm", out / "uih" / f"case{i:04d}.dcm"
        assert paths[2 * i : 2 * i + 2] == [ge_path, uih_path]
        assert (out / "truth" / f"case{i:04d}_mask.png").is_file()
        assert (out / "truth" / f"case{i:04d}.json").is_file()
        ge, uih = pydicom.dcmread(ge_path), pydicom.dcmread(uih_path)
        assert ge.Manufacturer == "GE MEDICAL SYSTEMS"
        assert ge.ManufacturerModelName == "Senographe Pristina"
        assert uih.Manufacturer == "UIH" and uih.ManufacturerModelName == "uMammo 890i"
        for key in ("Rows", "Columns", "ImageLaterality", "ViewPosition", "SOPClassUID"):
            assert ge[key].value == uih[key].value
        assert ge.SOPClassUID == MG_FOR_PRESENTATION and ge.Modality == "MG"
        assert ge.StudyInstanceUID != uih.StudyInstanceUID
        assert ge.SeriesInstanceUID != uih.SeriesInstanceUID
        assert (ge.BitsStored, ge.PhotometricInterpretation) == (12, "MONOCHROME2")
        assert (uih.BitsStored, uih.PhotometricInterpretation) == (14, "MONOCHROME1")
        assert ge.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_views_and_lateralities_all_occur(phantom_set: tuple[Path, list[Path]]) -> None:
    """Four consecutive cases cover LCC, RCC, LMLO and RMLO with matching view codes."""
    out, _ = phantom_set
    seen = set()
    for i in range(4):
        ds = pydicom.dcmread(out / "ge" / f"case{i:04d}.dcm")
        seen.add((ds.ViewPosition, ds.ImageLaterality))
        code = ds.ViewCodeSequence[0].CodeValue
        assert code == {"CC": "R-10242", "MLO": "R-10226"}[ds.ViewPosition]
        assert ds.PatientOrientation[0] == ("A" if ds.ImageLaterality == "L" else "P")
    assert seen == {("CC", "L"), ("CC", "R"), ("MLO", "L"), ("MLO", "R")}


def test_stored_values_match_the_renderings(phantom_set: tuple[Path, list[Path]]) -> None:
    """Stored pixels are the renderings on the full 12/14-bit range, MONOCHROME1 inverted."""
    out, _ = phantom_set
    case = make_case(case_spec(0, seed=5, size=SIZE))
    ge = pydicom.dcmread(out / "ge" / "case0000.dcm").pixel_array
    uih = pydicom.dcmread(out / "uih" / "case0000.dcm").pixel_array
    assert ge.max() <= 4095 and uih.max() <= 16383
    np.testing.assert_allclose(StoredRange.full(12).to_unit(ge), case.ge, atol=0.6 / 4095)
    back = StoredRange.full(14, invert=True).to_unit(uih)
    np.testing.assert_allclose(back, case.uih, atol=0.6 / 16383)
    breast = np.median(ge[case.mask])
    assert 800 < breast < 3500  # a plausible band, neither crushed nor clipped


def test_ground_truth_matches_the_case(phantom_set: tuple[Path, list[Path]]) -> None:
    """The JSON truth and mask PNG redraw exactly the case written to DICOM."""
    out, _ = phantom_set
    truth = json.loads((out / "truth" / "case0001.json").read_text())
    case = make_case(case_spec(1, seed=5, size=SIZE))
    assert truth["seed"] == case.spec.seed and truth["set_seed"] == 5
    np.testing.assert_allclose(np.array(truth["calcs"]), case.calcs, atol=1e-3)
    np.testing.assert_allclose(np.array(truth["masses"]), case.masses, atol=1e-3)
    assert truth["files"] == {"GE": "ge/case0001.dcm", "UIH": "uih/case0001.dcm"}
    ds = pydicom.dcmread(out / truth["files"]["GE"])
    assert (truth["view"], truth["laterality"]) == (ds.ViewPosition, ds.ImageLaterality)
    assert [float(v) for v in ds.ImagerPixelSpacing] == [truth["pixel_spacing_mm"]] * 2
    mask = np.asarray(Image.open(out / "truth" / "case0001_mask.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask > 0, case.mask)


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    """Two runs with one seed write byte-identical files; another seed changes the UIDs."""
    a = write_phantom_set(tmp_path / "a", 1, size=SIZE, seed=2, vendors=("GE",))
    b = write_phantom_set(tmp_path / "b", 1, size=SIZE, seed=2, vendors=("GE",))
    c = write_phantom_set(tmp_path / "c", 1, size=SIZE, seed=3, vendors=("GE",))
    assert a[0].read_bytes() == b[0].read_bytes()
    assert pydicom.dcmread(a[0]).SOPInstanceUID != pydicom.dcmread(c[0]).SOPInstanceUID


def test_j2k_round_trip_is_lossless(case: PhantomCase, tmp_path: Path) -> None:
    """JPEG 2000 lossless files decode to exactly the uncompressed pixels, for both vendors."""
    for vendor in ("GE", "UIH"):
        plain = phantom_dataset(case, vendor)
        packed = phantom_dataset(case, vendor, j2k=True)
        path = tmp_path / f"{vendor}.dcm"
        pydicom.dcmwrite(path, packed, enforce_file_format=True)
        back = pydicom.dcmread(path)
        assert back.file_meta.TransferSyntaxUID == JPEG2000Lossless
        assert back.SOPInstanceUID == plain.SOPInstanceUID
        assert back.LossyImageCompression == "00"
        np.testing.assert_array_equal(back.pixel_array, plain.pixel_array)


def test_options_override_vendor_defaults(case: PhantomCase) -> None:
    """Explicit photometric and bit depth apply; bad values are refused."""
    ds = phantom_dataset(case, "GE", photometric="MONOCHROME1", bits_stored=14)
    assert (ds.PhotometricInterpretation, ds.BitsStored, ds.HighBit) == ("MONOCHROME1", 14, 13)
    assert ds.PresentationLUTShape == "INVERSE" and ds.PixelIntensityRelationshipSign == 1
    assert int(ds.pixel_array.max()) <= 16383
    with pytest.raises(ValueError, match="vendor"):
        phantom_dataset(case, "Hologic")
    with pytest.raises(ValueError, match="photometric"):
        phantom_dataset(case, "GE", photometric="RGB")


@needs_dciodvfy
@pytest.mark.parametrize(
    ("vendor", "photometric", "j2k"),
    [
        ("GE", None, False),
        ("UIH", None, False),
        ("GE", "MONOCHROME1", False),
        ("UIH", "MONOCHROME2", False),
        ("GE", None, True),
        ("UIH", None, True),
    ],
)
def test_dciodvfy_reports_no_errors(
    case: PhantomCase, tmp_path: Path, vendor: str, photometric: str | None, j2k: bool
) -> None:
    """dciodvfy finds no IOD errors for either vendor, photometric or transfer syntax."""
    for index in (0, 2):  # a CC and an MLO case
        c = case if index == 0 else make_case(case_spec(index, seed=1, size=SIZE))
        ds = phantom_dataset(c, vendor, photometric=photometric, j2k=j2k, patient_index=index)
        path = tmp_path / f"{vendor}{index}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        assert iod_errors(path) == []


def test_run_phantom_command_writes_with_progress(tmp_path: Path) -> None:
    """The CLI entry writes the requested vendors and returns their DICOM paths."""
    paths = run_phantom_command(
        tmp_path, 2, SIZE, 0, ("UIH",), j2k=False, photometric=None, bits=None, progress=True
    )
    assert paths == [tmp_path / "uih" / "case0000.dcm", tmp_path / "uih" / "case0001.dcm"]
    assert not (tmp_path / "ge").exists()
    assert pydicom.dcmread(paths[1]).Manufacturer == "UIH"
