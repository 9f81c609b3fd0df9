"""End-to-end between two real Orthanc servers: A (the PACS) -> `mr2nst serve` -> B (the CAD).

A uploads GE phantoms, a UIH phantom and a CT over REST and sends them to the node with
`/modalities/mr2nst/store`. The node normalizes GE MG with ehm and forwards everything else
to B over DICOM, except the UIH phantom, which goes to B's DICOMweb (STOW-RS, transcoded
to JPEG 2000 lossless). Everything is checked in B over REST.
"""

from __future__ import annotations

import io
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc, dataset_bytes
from peers import DCMTK, Serve, render_toml, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from mr2nst.node.config import parse_config

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed (Debian: orthanc)"),
    pytest.mark.skipif(
        DICOMWEB_PLUGIN is None,
        reason="Orthanc's DICOMweb plugin is not installed (Debian: orthanc-dicomweb)",
    ),
    pytest.mark.skipif(
        not DCMTK, reason="DCMTK not installed (`mr2nst serve` is probed with echoscu)"
    ),
]

SUFFIX = parse_config({}, environ={}).derived.description_suffix
WAIT_S = 120


def write_ct(path: Path) -> Path:
    """A small CT image with a private block (it has no route but the catch-all)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = "Test^CT"
    ds.PatientID = "PID-CT-1"
    ds.StudyDate = ds.SeriesDate = "20240102"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "ACC-CT-1"
    ds.Modality = "CT"
    ds.Manufacturer = "SIEMENS"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    block = ds.private_block(0x0029, "MR2NST TEST", create=True)
    block.add_new(0x10, "LO", "kept byte for byte")
    arr = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 3) % 4096
    ds.set_pixel_data(arr, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ml_view(source: Path, path: Path) -> Path:
    """A GE MG with ViewPosition ML: no bank reference matches it, so ehm cannot run."""
    ds = pydicom.dcmread(source)
    ds.ViewPosition = "ML"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Site:
    a: Orthanc
    b: Orthanc
    node: Serve
    ge: list[Path]
    uih: Path
    ct: Path
    ml: Path

    def in_b(self, sop_uid: str) -> dict | None:
        return next(
            (i for i in self.b.instances() if i["MainDicomTags"]["SOPInstanceUID"] == sop_uid),
            None,
        )


def uid(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).get(keyword))


@pytest.fixture(scope="module")
def site(tmp_path_factory, phantoms) -> Iterator[Site]:
    """A and B running, the node between them, and everything sent from A to the node."""
    from support import uih_bank_files

    from mr2nst.bank.bank import Bank

    root = tmp_path_factory.mktemp("orthanc")
    bank = Bank(root / "bank")
    assert len(bank.add([uih_bank_files(root / "uih-bank")]).added) == 4
    files = root / "files"
    files.mkdir()
    ct = write_ct(files / "ct.dcm")
    ml = write_ml_view(phantoms["ge"][0], files / "ml.dcm")
    uih = phantoms["uih"][0]

    routes = [
        {
            "name": "ge-mammo",
            "match": {"Modality": "MG", "Manufacturer": "GE*"},
            "action": "normalize",
            "method": "ehm",
            "destinations": ["b"],
        },
        {
            "name": "uih-web",
            "match": {"Manufacturer": "UIH*"},
            "action": "forward",
            "destinations": ["web"],
        },
        {"name": "everything-else", "match": {}, "action": "forward", "destinations": ["b"]},
    ]
    started: list[Orthanc | Serve] = []
    try:
        # The node's port is fixed first (Serve picks it), so the Orthancs can name it.
        node = Serve(
            root,
            routes,
            {"b": 0},
            bank={"path": str(bank.layout.root), "allow_fewer": True},
            methods={"references": 5},
        )
        the_node = ("MR2NST", "127.0.0.1", node.port)
        b = Orthanc(root / "b", "ORTHANCB", {"mr2nst": the_node}, dicomweb=True)
        a = Orthanc(root / "a", "ORTHANCA", {"mr2nst": the_node})
        cfg = tomllib.loads(node.config_path.read_text())
        cfg["destinations"] = {
            "b": {"ae_title": "ORTHANCB", "host": "127.0.0.1", "port": b.dicom_port},
            "web": {
                "kind": "stow",
                "url": b.dicomweb_url,
                "transfer_syntax": "j2k-lossless",
                "max_associations": 1,
            },
        }
        node.config_path.write_text(render_toml(cfg))
        for thing in (b, a, node):
            started.append(thing)  # before start: a failed start is stopped too
            thing.start()
        ids = [a.upload(p) for p in [*phantoms["ge"], uih, ct, ml]]
        a.store("mr2nst", ids)
        yield Site(a, b, node, list(phantoms["ge"]), uih, ct, ml)
    finally:
        for thing in reversed(started):
            if isinstance(thing, Orthanc):
                thing.stop()
            elif thing.proc is not None and thing.proc.poll() is None:
                try:
                    thing.stop(signal.SIGTERM)
                except subprocess.TimeoutExpired:
                    thing.kill9()


def test_ge_phantoms_come_back_as_a_derived_series_in_their_study(site):
    """B holds one derived series per GE source series, in the source study, DERIVED, suffixed."""
    sources = {uid(p): pydicom.dcmread(p, stop_before_pixels=True) for p in site.ge}

    def derived() -> list[dict] | None:
        found = [
            i
            for i in site.b.instances()
            if i["MainDicomTags"]["SOPInstanceUID"] not in sources
            and site.b.tags(i["ID"]).get("Manufacturer", "").startswith("GE")
            and "DERIVED" in site.b.tags(i["ID"]).get("ImageType", "")
        ]
        return found if len(found) >= len(sources) else None

    found = wait_for(derived, WAIT_S, "the derived GE instances in B")
    for instance in found:
        tags = site.b.tags(instance["ID"])
        source = sources[tags["SourceImageSequence"][0]["ReferencedSOPInstanceUID"]]
        assert tags["StudyInstanceUID"] == source.StudyInstanceUID
        assert tags["SeriesInstanceUID"] != source.SeriesInstanceUID
        assert tags["ImageType"].split("\\")[0] == "DERIVED"
        assert tags["SeriesDescription"].endswith(SUFFIX.strip())
        assert "method=ehm" in tags["DerivationDescription"]
        assert site.b.metadata(instance["ID"], "RemoteAET") == "MR2NST"
    studies = {site.b.tags(i["ID"])["StudyInstanceUID"] for i in found}
    assert studies == {s.StudyInstanceUID for s in sources.values()}


def test_ct_passes_byte_identical(site):
    """The CT (catch-all forward route) reaches B with the same data set, byte for byte."""
    sop = uid(site.ct)
    instance = wait_for(lambda: site.in_b(sop), WAIT_S, "the CT in B")
    got = site.b.file(instance["ID"])
    assert dataset_bytes(got) == dataset_bytes(site.ct.read_bytes())
    assert site.b.metadata(instance["ID"], "TransferSyntax") == ExplicitVRLittleEndian


def test_stow_destination_delivers_to_dicomweb_transcoded(site):
    """The UIH phantom's route posts it to B's DICOMweb (STOW-RS) as JPEG 2000 lossless."""
    sop = uid(site.uih)
    instance = wait_for(lambda: site.in_b(sop), WAIT_S, "the UIH instance in B via STOW-RS")
    assert site.b.metadata(instance["ID"], "TransferSyntax") == JPEG2000Lossless
    assert site.b.metadata(instance["ID"], "Origin") != "DicomProtocol"
    received = pydicom.dcmread(io.BytesIO(site.b.file(instance["ID"])))
    original = pydicom.dcmread(site.uih)
    assert np.array_equal(received.pixel_array, original.pixel_array)
    events = [
        e
        for e in site.node.events()
        if e.get("event") == "stage_forward" and e.get("destination") == "web"
    ]
    assert events and events[-1]["outcome"] == "sent"


def test_b_echoes_the_node(site):
    """B's C-ECHO to the node succeeds (REST /modalities/mr2nst/echo)."""
    site.b.echo("mr2nst")


def test_ml_view_falls_back_to_the_original(site):
    """A GE ML view cannot be normalized: the original goes to B unchanged (forward-original)."""
    sop = uid(site.ml)
    instance = wait_for(lambda: site.in_b(sop), WAIT_S, "the ML original in B")
    assert dataset_bytes(site.b.file(instance["ID"])) == dataset_bytes(site.ml.read_bytes())
    assert site.b.tags(instance["ID"])["ImageType"].split("\\")[0] != "DERIVED"
