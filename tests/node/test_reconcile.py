"""A lost ledger: the node refuses to start; `mr2nst ledger rebuild` re-registers the files."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from dicom_factory import make_mg
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from mr2nst.node.cli.main import main
from mr2nst.node.config import load_config
from mr2nst.node.ledger import Ledger
from mr2nst.node.ledger.reconcile import find_orphans
from mr2nst.node.service.node import LostLedgerError, Node

WAIT_S = 60.0


class Sink:
    """A storage SCP that records the SOP Instance UIDs it receives."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.lock = threading.Lock()
        ae = AE("CAD")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian])
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        with self.lock:
            self.received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000


@pytest.fixture
def sink():
    peer = Sink()
    yield peer
    peer.server.shutdown()


def site(tmp_path, port):
    """A config (normalize with passthrough, to `cad`) and its data_dir with two orphans:
    a received file in spool/in and a derived output in outbox/ (their ledger is lost)."""
    data = tmp_path / "data"
    conf = tmp_path / "node.toml"
    conf.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = 0\ndata_dir = "{data}"\nmin_free_disk_mb = 0\n'
        '[[routes]]\nname = "mg"\nmatch = { Modality = "MG" }\nmethod = "passthrough"\n'
        'destinations = ["cad"]\n'
        f'[destinations.cad]\nae_title = "CAD"\nhost = "127.0.0.1"\nport = {port}\n'
        "[forwarding]\nbackoff_initial_s = 1\n"
    )
    (data / "spool" / "in").mkdir(parents=True)
    (data / "outbox").mkdir()
    received = make_mg(seed=1)
    received.save_as(data / "spool" / "in" / "lost-received.dcm", enforce_file_format=True)
    output = make_mg(seed=2, series_uid=generate_uid(), sop_uid=generate_uid())
    ref = Dataset()
    ref.ReferencedSOPClassUID = output.SOPClassUID
    ref.ReferencedSOPInstanceUID = generate_uid()
    output.SourceImageSequence = Sequence([ref])
    output.save_as(data / "outbox" / "lost-output.dcm", enforce_file_format=True)
    Ledger.open(load_config(conf).ledger_url).close()  # an empty, new ledger
    return conf, data, received, output


def rebuild(conf, capsys, *extra):
    code = main(["ledger", "rebuild", "--config", str(conf), *extra])
    return code, capsys.readouterr()


def test_node_refuses_to_start_with_files_the_ledger_lost(tmp_path):
    conf, data, _, _ = site(tmp_path, 1)
    with pytest.raises(LostLedgerError, match="ledger rebuild"):
        Node(load_config(conf)).start()
    # From the CLI: one line, exit 1, saying what was found and how to recover.
    done = subprocess.run(
        [sys.executable, "-m", "mr2nst.node.cli.main", "serve", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert "1 file(s) in spool/in and 1 in outbox/" in line
    assert "mr2nst ledger rebuild --config FILE" in line


def test_rebuild_registers_then_the_node_delivers(tmp_path, capsys, sink):
    conf, data, received, output = site(tmp_path, sink.port)
    code, out = rebuild(conf, capsys, "--json")
    assert code == 0, out.err
    report = json.loads(out.out)
    assert {r["kind"] for r in report["registered"]} == {"received", "output"}
    assert report["left"] == []
    # Idempotent: a second run finds nothing.
    code, out = rebuild(conf, capsys)
    assert code == 0 and "0 file(s) registered, 0 left in place" in out.out
    cfg = load_config(conf)
    ledger = Ledger.open(cfg.ledger_url)
    try:
        assert not find_orphans(ledger, data / "spool" / "in", data / "outbox")
    finally:
        ledger.close()
    node = Node(cfg).start()
    try:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with sink.lock:
                got = list(sink.received)
            if len(got) >= 2:
                break
            time.sleep(0.2)
    finally:
        node.stop()
    # The output is delivered as it is; the received instance is normalized (a new UID).
    assert str(output.SOPInstanceUID) in got and len(got) == 2
    assert str(received.SOPInstanceUID) not in got


def test_rebuild_leaves_what_it_cannot_derive(tmp_path, capsys):
    conf, data, _, _ = site(tmp_path, 1)
    # An output that names no source, and a file that is not DICOM.
    make_mg(seed=3).save_as(data / "outbox" / "no-source.dcm", enforce_file_format=True)
    (data / "spool" / "in" / "junk.dcm").write_bytes(b"not dicom")
    code, out = rebuild(conf, capsys)
    assert code == 0
    assert "2 file(s) registered, 2 left in place" in out.out
    assert "no-source.dcm" in out.out and "junk.dcm" in out.out
    # The output left in place still stops the node: nothing is silently forgotten.
    with pytest.raises(LostLedgerError, match="0 file\\(s\\) in spool/in and 1 in outbox/"):
        Node(load_config(conf)).start()


def test_interrupted_receive_is_registered_at_start(tmp_path, capsys):
    """A spool/in file written around the newest recorded arrival, without a row (a receive
    cut between the file's rename and the row's commit), does not stop the node: it is
    registered at start."""
    conf, data, _, _ = site(tmp_path, 1)
    (data / "outbox" / "lost-output.dcm").unlink()
    code, _ = rebuild(conf, capsys)  # the ledger now has a recent row
    assert code == 0
    make_mg(seed=4).save_as(data / "spool" / "in" / "cut.dcm", enforce_file_format=True)
    cfg = load_config(conf)
    ledger = Ledger.open(cfg.ledger_url)
    try:
        orphans = find_orphans(ledger, data / "spool" / "in", data / "outbox")
    finally:
        ledger.close()
    assert not orphans and [p.name for p in orphans.interrupted] == ["cut.dcm"]
    node = Node(cfg).start()
    try:
        assert not find_orphans(node.ledger, data / "spool" / "in", data / "outbox").interrupted
    finally:
        node.stop()


def test_old_files_without_rows_stop_the_node(tmp_path, capsys):
    """A spool/in file older than the newest row and without one still counts as lost (a
    ledger restored from an old backup): the node does not start."""
    conf, data, _, _ = site(tmp_path, 1)
    (data / "outbox" / "lost-output.dcm").unlink()
    code, _ = rebuild(conf, capsys)
    assert code == 0
    old_file = data / "spool" / "in" / "old.dcm"
    make_mg(seed=5).save_as(old_file, enforce_file_format=True)
    old = time.time() - 3600
    os.utime(old_file, (old, old))
    with pytest.raises(LostLedgerError, match="1 file\\(s\\) in spool/in and 0 in outbox/"):
        Node(load_config(conf)).start()
