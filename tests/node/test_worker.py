"""Tests of the worker loop and the processing pipeline."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import make_mg
from structlog.testing import capture_logs

from mr2nst.node.config import parse_config
from mr2nst.node.dicom.pixels import decode_stored
from mr2nst.node.ledger import InstanceState, Ledger, Received
from mr2nst.node.service.spool import Spool
from mr2nst.node.service.transfer import run_transfer
from mr2nst.node.service.worker import Worker


class Clock:
    """A fake clock for the ledger: time moves only when a test sets ``t``."""

    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    """A fake clock at a fixed time."""
    return Clock()


@pytest.fixture
def env(tmp_path, clock):
    """A config, spool, ledger (on the fake clock) and worker under ``tmp_path``."""
    cfg = parse_config(
        {"node": {"data_dir": str(tmp_path / "d")}, "workers": {"max_attempts": 2}}, environ={}
    )
    spool = Spool(cfg.node.data_dir).create()
    ledger = Ledger.open(cfg.ledger_url, clock=clock)
    yield cfg, spool, ledger, Worker(cfg, ledger, spool, "t")
    ledger.close()


def enqueue(
    ledger, spool, data: bytes, action="normalize", method="passthrough", priority=0
) -> int:
    """Spool ``data`` and record it as received; returns the job id."""
    path = spool.write_incoming(data)
    return ledger.record(
        Received(
            "1.2.840.10008.5.1.4.1.1.1.2",
            "1.2.3",
            "1",
            "2",
            "ts",
            "MOD",
            "MR2NST",
            "p",
            "r",
            action,
            method if action == "normalize" else None,
            ("cad",),
            InstanceState.RECEIVED,
            str(path),
            priority=priority,
        )
    )


def dicom_bytes(ds, tmp_path: Path) -> bytes:
    """``ds`` as a DICOM file's bytes."""
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_passthrough_job_writes_derived_to_outbox(env, tmp_path):
    """A normalize job ends `transformed`, its derived file in the outbox, a delivery pending."""
    cfg, spool, ledger, worker = env
    src = make_mg()
    enqueue(ledger, spool, dicom_bytes(src, tmp_path))
    assert worker.run_once() and not worker.run_once()
    [row] = ledger.queue()
    assert row["state"] == "transformed" and row["deliveries"][0]["state"] == "pending"
    out = pydicom.dcmread(row["output_path"])
    assert (
        Path(row["output_path"]).parent == spool.outbox and out.SOPInstanceUID == row["out_sop_uid"]
    )
    assert np.array_equal(decode_stored(out), decode_stored(src))


def test_forward_instance_never_reaches_a_worker(env, tmp_path):
    """A forward is the forwarder's alone: no worker claims it, it logs no stage_transform."""
    _, spool, ledger, worker = env
    enqueue(ledger, spool, dicom_bytes(make_mg(), tmp_path), action="forward")
    with capture_logs() as logs:
        assert not worker.run_once()
    assert not [e for e in logs if e["event"] == "stage_transform"]
    [row] = ledger.queue()
    assert row["state"] == "transformed" and row["lane"] == "forward"
    assert row["output_path"] is None and row["deliveries"][0]["state"] == "pending"


def test_worker_takes_the_higher_priority_job_first(env, tmp_path):
    """Of two waiting jobs the worker processes the one of the higher-priority route first."""
    _, spool, ledger, worker = env
    data = dicom_bytes(make_mg(), tmp_path)
    low = enqueue(ledger, spool, data, priority=0)
    high = enqueue(ledger, spool, data, priority=10)
    assert worker.run_once()
    states = {r["id"]: r["state"] for r in ledger.queue()}
    assert states == {high: "transformed", low: "received"}


def test_corrupt_input_fails_permanently_and_moves_to_dead(env):
    """An unreadable stored file fails at once and is kept in dead/ for the admin."""
    _, spool, ledger, worker = env
    enqueue(ledger, spool, b"not dicom at all")
    worker.run_once()
    [row] = ledger.queue()
    assert row["state"] == "failed" and "PixelError" in row["error"]
    assert Path(row["spool_path"]).parent == spool.dead and Path(row["spool_path"]).exists()


def test_unexpected_error_is_retried_then_failed(env, tmp_path, monkeypatch, clock):
    """An unexpected method error requeues the job, then fails it at workers.max_attempts."""
    _, spool, ledger, worker = env

    def boom(*_a, **_k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(worker.pipeline, "derive", boom)
    enqueue(ledger, spool, dicom_bytes(make_mg(), tmp_path))
    worker.run_once()
    assert ledger.queue()[0]["state"] == "received"
    assert not worker.run_once()  # waiting for its retry time
    clock.t += 300  # past the longest retry delay
    assert worker.run_once()
    assert (
        ledger.queue()[0]["state"] == "failed"
        and "CUDA out of memory" in ledger.queue()[0]["error"]
    )


def test_transfer_offline_writes_derived_files(tmp_path):
    """`transfer` writes one derived file per input and reports unreadable inputs."""
    src = make_mg()
    (tmp_path / "in").mkdir()
    src.save_as(tmp_path / "in" / "a.dcm", enforce_file_format=True)
    (tmp_path / "in" / "junk.dcm").write_bytes(b"junk")
    cfg = parse_config({}, environ={})
    results = run_transfer(cfg, [str(tmp_path / "in")], tmp_path / "out", method="passthrough")
    ok = [r for r in results if not r["error"]]
    bad = [r for r in results if r["error"]]
    assert len(ok) == 1 and len(bad) == 1 and "junk.dcm" in bad[0]["input"]
    out = pydicom.dcmread(ok[0]["output"])
    assert (
        out.ImageType[0] == "DERIVED"
        and out.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    )


def test_workers_spread_over_gpus(monkeypatch):
    """With several GPUs, worker i uses GPU i mod count; an explicit device is kept."""
    import torch

    from mr2nst.node.service.worker import pin_gpu

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = parse_config({"engine": {"device": "auto"}, "workers": {"count": 3}}, environ={})
    assert [pin_gpu(cfg, i).engine.device for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    fixed = parse_config({"engine": {"device": "cuda:1"}}, environ={})
    assert pin_gpu(fixed, 0).engine.device == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert pin_gpu(cfg, 1).engine.device == "auto"
