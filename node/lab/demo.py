"""``mr2nst demo``: a self-contained end-to-end run on this machine.

It writes phantom GE mammograms, starts a downstream sink SCP and a node on free local
ports, sends the images with C-STORE, waits for the derived series to arrive at the sink,
checks every derived instance, and writes a before/after PNG and a summary.

The phantom is written in both renderings (``phantom/ge`` is sent, ``phantom/uih`` is the
true UIH rendering of each source), so ``before_after.png`` shows, per image,
source | mr2NST output | fast student | true UIH with native-resolution zooms on a µC
cluster and on an edge: the evaluation's montage
(:func:`~mr2nst.node.lab.report.montage_png`). The fast student is trained by the demo on
its own GE images (a few epochs; ``mr2nst train-fast`` on a site's images is the real
thing) and run through the node's pipeline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.status import Status

from mr2nst.bank.bank import Bank
from mr2nst.node.config import Config, parse_config
from mr2nst.node.dicom.iod import dciodvfy_available, iod_errors
from mr2nst.node.dicom.pixels import decode
from mr2nst.node.dicom.scu import store_datasets
from mr2nst.node.dicom.sopclasses import ACCEPTED_TRANSFER_SYNTAXES
from mr2nst.node.lab.phantom_io import write_phantom_set
from mr2nst.node.logs import configure_logging
from mr2nst.node.service.node import Node

DEMO_METHOD = "mr2nst"
N_REFERENCES = 10  # phantom UIH images in the demo's bank (CC and MLO, both sides)
DEMO_PATCH = 128
DEMO_ITERATIONS = 8
FAST_EPOCHS = 6  # the demo's student: a few epochs on its own three images


class Sink:
    """A downstream C-STORE SCP (the "CAD") that keeps what it receives in memory and on disk."""

    def __init__(self, folder: Path, ae_title: str = "DEMO_CAD") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:  # always set in pynetdicom's storage contexts
                ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        self._ae = ae
        self.server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        with self._lock:
            self.received.append(ds)
        return int(Status.SUCCESS)

    def start(self) -> int:
        """Listen on a free local port; return it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.server = self._ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return int(self.server.server_address[1])

    def stop(self) -> None:
        """Stop listening (idempotent)."""
        if self.server is not None:
            self.server.shutdown()


def demo_config(
    data_dir: Path,
    sink_port: int,
    bank_dir: Path,
    engine: dict[str, Any] | None = None,
    fast_checkpoint: Path | None = None,
) -> Config:
    """The demo node's config: one route sending GE mammograms through mr2nst to the sink.

    ``engine`` overrides the demo's CPU-sized engine settings; ``fast_checkpoint`` is
    where the demo's student goes (``[fast] checkpoint``).
    """
    return parse_config(
        {
            "node": {
                "ae_title": "MR2NST",
                "host": "127.0.0.1",
                "port": 0,
                "data_dir": str(data_dir),
                "min_free_disk_mb": 64,
            },
            # CPU-sized engine settings (the real recipe, patch 512 x 400 iterations, needs a GPU);
            # hed-vgg16: learned VGG16 features available offline
            # (ImageNet's are not downloaded here).
            "engine": {
                "features": "hed-vgg16",
                "patch_size": DEMO_PATCH,
                "grids": [1, 2, 4],
                "iterations": DEMO_ITERATIONS,
                "pooling": "avg",
                "max_batch": 1,
                **(engine or {}),
            },
            "workers": {"count": 1, "lease_s": 60},
            "methods": {"references": 5},
            "bank": {"path": str(bank_dir), "allow_fewer": True},
            "fast": {"checkpoint": str(fast_checkpoint or "")},
            "routes": [
                {
                    "name": "ge-mammo",
                    "match": {"Modality": "MG", "Manufacturer": "GE*"},
                    "action": "normalize",
                    "method": DEMO_METHOD,
                    "destinations": ["cad"],
                }
            ],
            "destinations": {
                "cad": {"ae_title": "DEMO_CAD", "host": "127.0.0.1", "port": sink_port}
            },
            "forwarding": {"poll_s": 0.2, "backoff_initial_s": 1, "max_attempts": 3},
            "logging": {"format": "json", "level": "info"},
        },
        environ={},
    )


def check_derived(
    source: Dataset, derived: Dataset, config: Config, method: str = DEMO_METHOD
) -> list[str]:
    """The derived-series rules a CAD vendor relies on; returns the problems found."""
    problems = []
    if derived.SeriesInstanceUID == source.SeriesInstanceUID:
        problems.append("series UID not new")
    if derived.SOPClassUID != source.SOPClassUID:
        problems.append("SOP class changed")
    if derived.StudyInstanceUID != source.StudyInstanceUID or derived.PatientID != source.PatientID:
        problems.append("patient/study not kept")
    if derived.ImageType[0] != "DERIVED":
        problems.append("ImageType value 1 is not DERIVED")
    if int(derived.SeriesNumber) != int(source.SeriesNumber) + config.derived.series_number_offset:
        problems.append("SeriesNumber offset wrong")
    ref = derived.SourceImageSequence[0]
    if ref.ReferencedSOPInstanceUID != source.SOPInstanceUID:
        problems.append("SourceImageSequence does not reference the source")
    if (
        "seeded-random" in config.engine.features
        and method in ("mr2nst", "fast")
        and "seeded-random" not in derived.DerivationDescription
    ):
        problems.append("DerivationDescription does not say seeded-random")
    if f"method={method}" not in derived.DerivationDescription:
        problems.append("DerivationDescription does not name the method")
    if derived.PhotometricInterpretation != source.PhotometricInterpretation:
        problems.append("photometric interpretation changed")
    return problems


def before_after_png(
    pairs: Sequence[tuple[Dataset, Dataset]],
    path: Path,
    files: dict[str, Path] | None = None,
    fast: dict[str, Dataset] | None = None,
) -> None:
    """Per image: source | derived output (| fast) (| true UIH) with µC-cluster and edge zooms.

    ``fast`` maps a source SOPInstanceUID to the fast student's derived instance.

    ``files`` maps a source SOPInstanceUID to its phantom file ``DIR/ge/NAME.dcm``; the
    ground truth then comes from ``DIR/uih/NAME.dcm`` (true UIH), ``DIR/truth/NAME.json``
    (µCs) and ``DIR/truth/NAME_mask.png``. Without it the mask is segmented and there are
    no truth panel and no µC zoom.
    """
    from mr2nst.core.segmentation import segment_breast
    from mr2nst.node.lab.report import MontageCase, montage_png

    cases = []
    for source, derived in pairs:
        before = decode(source)
        panels = [("before (GE)", before.image), (f"after ({DEMO_METHOD})", decode(derived).image)]
        student = (fast or {}).get(str(source.SOPInstanceUID))
        if student is not None:
            panels.append(("fast (student)", decode(student).image))
        file = (files or {}).get(str(source.SOPInstanceUID))
        root, name = (file.parent.parent, file.stem) if file else (None, "image")
        mask_png = root / "truth" / f"{name}_mask.png" if root else None
        if mask_png is not None and mask_png.exists():
            mask = np.asarray(Image.open(mask_png)) > 127
        else:
            mask = segment_breast(before.image, before.info.view).mask
        calcs = None
        if root is not None and (root / "truth" / f"{name}.json").exists():
            data = json.loads((root / "truth" / f"{name}.json").read_text(encoding="utf-8"))
            calcs = np.asarray(data.get("calcs", []), dtype=np.float64).reshape(-1, 3)
        reference = before.image
        if root is not None and (root / "uih" / f"{name}.dcm").exists():
            reference = decode(pydicom.dcmread(root / "uih" / f"{name}.dcm")).image
            panels.append(("true UIH", reference))
        cases.append(MontageCase(name, panels, np.asarray(mask, dtype=bool), calcs, reference))
    montage_png(cases, path)


def run_demo(
    out: Path,
    n: int = 3,
    size: tuple[int, int] = (2294, 1914),
    timeout_s: float = 600.0,
    engine: dict[str, Any] | None = None,
    n_references: int = N_REFERENCES,
    fast_epochs: int = FAST_EPOCHS,
) -> bool:
    """Run the whole path once; print a summary and return True when every check passed.

    Args:
        out: the demo's folder (replaced).
        n: phantom GE images to send.
        size: their rows and columns.
        timeout_s: how long to wait for the derived instances.
        engine: engine settings over the demo's (the tests use tiny ones).
        n_references: phantom UIH images in the reference bank.
        fast_epochs: epochs of the demo's fast student (trained on the sent images).

    Returns:
        Whether every image was acknowledged, normalized, received and passed the checks.
    """
    started = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with _logs_to(out / "node.log"):
        files = _phantom_sources(out, n, size)
        sources = [pydicom.dcmread(p) for p in files.values()]
        print(f"demo: wrote {len(sources)} phantom GE mammograms ({size[0]}x{size[1]})")
        _reference_bank(out, n_references, size)
        sink = Sink(out / "received")
        try:
            config = demo_config(
                out / "node-data", sink.start(), out / "bank", engine, out / "fast.pt"
            )
            acked = _send_and_wait(config, sink, sources, timeout_s)
        finally:
            sink.stop()
        fast = _fast_student(out, config, sources, fast_epochs)
    pairs, problems, errors = _check_received(out, sources, sink.received, config, files, fast)
    summary: dict[str, Any] = {
        "sent": len(sources),
        "acknowledged": acked,
        "derived_received": len(sink.received),
        "derived_series": sorted({str(d.SeriesInstanceUID) for _, d in pairs}),
        "method": DEMO_METHOD,
        "fast_derived": len(fast),
        "problems": problems,
        "iod_errors": errors,
        "seconds": round(time.monotonic() - started, 1),
        "before_after_png": str(out / "before_after.png"),
        "log": str(out / "node.log"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    ok = (
        acked == len(sources)
        and len(pairs) == len(sources)
        and len(fast) == len(sources)
        and not problems
        and all(not e for e in errors.values())
    )
    print(
        f"demo: {len(pairs)}/{len(sources)} derived instances received in "
        f"{len(summary['derived_series'])} derived series; IOD errors: "
        f"{sum(e or 0 for e in errors.values())}; problems: {len(problems)}"
    )
    print(f"demo: before/after picture {out / 'before_after.png'}; summary {out / 'summary.json'}")
    print(f"demo: {'OK' if ok else 'FAILED'} in {summary['seconds']} s")
    return ok


@contextlib.contextmanager
def _logs_to(path: Path) -> Iterator[None]:
    """The node's logs, and its worker processes' stderr (they inherit fd 2), go to ``path``."""
    log_file = path.open("w")
    configure_logging("json", "info", stream=log_file)
    saved_stderr = os.dup(2)
    os.dup2(log_file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        configure_logging("json", "warning")  # the log file closes now; later events go to stderr
        log_file.close()


def _phantom_sources(out: Path, n: int, size: tuple[int, int]) -> dict[str, Path]:
    """Write the paired phantom set; return its GE files by SOP Instance UID."""
    written = write_phantom_set(out / "phantom", n, size=size, seed=7, vendors=("GE", "UIH"))
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in written
        if p.parent.name == "ge"
    }


def _reference_bank(out: Path, n_references: int, size: tuple[int, int]) -> None:
    """The demo's reference bank of phantom UIH images (other seeds than the sources)."""
    write_phantom_set(out / "references", n_references, size=size, seed=1000, vendors=("UIH",))
    bank = Bank(out / "bank")
    added = bank.add([out / "references" / "uih"]).added
    print(f"demo: built a reference bank of {len(added)} phantom UIH mammograms in {out / 'bank'}")


def _send_and_wait(config: Config, sink: Sink, sources: Sequence[Dataset], timeout_s: float) -> int:
    """Start the node, C-STORE the sources to it and wait for their derived instances.

    Returns:
        How many sources the node acknowledged.
    """
    node = Node(config).start()
    try:
        print(
            f"demo: node MR2NST listening on 127.0.0.1:{node.port}, sink DEMO_CAD on "
            f"127.0.0.1:{config.destinations['cad'].port}"
        )
        outcomes = store_datasets(
            [(str(s.SOPInstanceUID), s) for s in sources],
            "127.0.0.1",
            node.port,
            calling="DEMO_MODALITY",
            called="MR2NST",
        )
        acked = sum(1 for o in outcomes if o.status == Status.SUCCESS)
        print(f"demo: C-STORE acknowledged {acked}/{len(sources)}")
        deadline = time.monotonic() + (timeout_s if acked else 0)
        while len(sink.received) < len(sources) and time.monotonic() < deadline:
            counts = node.ledger.counts() if node.ledger else {}
            if counts.get("failed", 0) or counts.get("delivery_dead", 0):
                print(f"demo: giving up early, the ledger reports {counts}")
                break
            time.sleep(0.2)
    finally:
        node.stop()
    return acked


def _fast_student(
    out: Path, config: Config, sources: Sequence[Dataset], epochs: int
) -> dict[str, Dataset]:
    """Train a small fast student on the demo's own GE images (its teacher: the demo's
    mr2nst method), then derive each source with it through the node's pipeline.

    Returns:
        The fast derived instance of each source, by the source's SOP Instance UID.
    """
    from mr2nst.node.lab.train_fast import FastTrainingSettings, train_fast
    from mr2nst.node.methods.registry import MethodCache
    from mr2nst.node.service.pipeline import Pipeline

    started = time.monotonic()
    settings = FastTrainingSettings(
        source=str(out / "phantom" / "ge"),
        config="(the demo's)",
        out=out / "fast.pt",
        epochs=epochs,
        teacher_cache=out / "fast-teacher-cache",
        crop=128,
    )
    with (out / "fast-training.jsonl").open("w") as events, contextlib.redirect_stdout(events):
        summary = train_fast(settings, config)
    print(
        f"demo: trained a fast student ({summary['parameters']} parameters, {epochs} epochs) "
        f"on the {len(sources)} images in {time.monotonic() - started:.0f} s"
    )
    pipeline = Pipeline(config, MethodCache(config))
    derived = {str(s.SOPInstanceUID): pipeline.derive(s, "fast") for s in sources}
    (out / "fast").mkdir(exist_ok=True)
    for d in derived.values():
        d.save_as(out / "fast" / f"{d.SOPInstanceUID}.dcm", enforce_file_format=True)
    return derived


def _check_received(
    out: Path,
    sources: Sequence[Dataset],
    received: Sequence[Dataset],
    config: Config,
    files: dict[str, Path],
    fast: dict[str, Dataset],
) -> tuple[list[tuple[Dataset, Dataset]], dict[str, list[str]], dict[str, int]]:
    """Pair each source with its derived instance, check them, draw the before/after picture.

    Returns:
        The (source, derived) pairs, the problems found per source SOP Instance UID (only
        those with problems), and dciodvfy's error count per received file (empty without
        dciodvfy).
    """
    by_source = {d.SourceImageSequence[0].ReferencedSOPInstanceUID: d for d in received}
    pairs = [(s, by_source[s.SOPInstanceUID]) for s in sources if s.SOPInstanceUID in by_source]
    problems = {str(s.SOPInstanceUID): check_derived(s, d, config) for s, d in pairs}
    for s in sources:  # the fast student's outputs pass the same checks
        student = fast.get(str(s.SOPInstanceUID))
        if student is not None:
            found = [f"fast: {p}" for p in check_derived(s, student, config, "fast")]
            problems[str(s.SOPInstanceUID)] = problems.get(str(s.SOPInstanceUID), []) + found
    files_received = sorted((out / "received").glob("*.dcm"))
    errors = {p.name: len(iod_errors(p)) for p in files_received} if dciodvfy_available() else {}
    if pairs:
        before_after_png(pairs, out / "before_after.png", files, fast)
    return pairs, {k: v for k, v in problems.items() if v}, errors
