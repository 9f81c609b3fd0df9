"""End-to-end: `mr2nst config reload` (SIGHUP) changes routes and destinations in a running
node without dropping an association in flight.

pynetdicom SCU -> `mr2nst serve` -> two DCMTK storescp.
"""

from __future__ import annotations

import signal

import pydicom
import pytest
from peers import DCMTK, Serve, StoreSCP, wait_for, write_ct
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not DCMTK, reason="DCMTK not installed")]

CT_TO_CAD = {
    "name": "ct",
    "match": {"Modality": "CT"},
    "action": "forward",
    "destinations": ["cad"],
}


def uids(scp: StoreSCP) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.files()]


def test_reload_moves_a_route_while_an_association_stays_open(tmp_path, cleanup):
    """An association opened before the reload goes on; its next instance takes the new route."""
    cad, pacs = StoreSCP(tmp_path, "CAD").start(), StoreSCP(tmp_path, "PACS").start()
    cleanup(cad), cleanup(pacs)
    node = Serve(tmp_path, [CT_TO_CAD], {"cad": cad.port}).start()
    cleanup(node)
    first, second = (write_ct(tmp_path / "in" / f"{i}.dcm") for i in (1, 2))

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MR2NST")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(first).Status) == 0
        text = node.config_path.read_text().replace(
            'destinations = ["cad"]', 'destinations = ["pacs"]'
        )
        text += f'[destinations.pacs]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
        node.config_path.write_text(text)
        out = node.cli("config", "reload")
        assert out.returncode == 0, out.stderr
        assert "changed: routes, destinations" in out.stdout
        assert assoc.is_established  # the reload did not touch the open association
        assert int(assoc.send_c_store(second).Status) == 0
    finally:
        assoc.release()

    first_uid = str(pydicom.dcmread(first).SOPInstanceUID)
    second_uid = str(pydicom.dcmread(second).SOPInstanceUID)
    wait_for(lambda: uids(cad) == [first_uid], 30, "the first CT at the CAD")
    wait_for(lambda: uids(pacs) == [second_uid], 30, "the second CT at the PACS")
    [reloaded] = node.wait_for_event("config_reloaded")
    assert reloaded["routes"] == ["ct"] and reloaded["destinations"] == ["cad", "pacs"]


def test_sighup_with_a_broken_file_keeps_the_running_routes(tmp_path, cleanup):
    """A SIGHUP while the file is broken logs why and keeps routing as before."""
    cad = StoreSCP(tmp_path, "CAD").start()
    cleanup(cad)
    node = Serve(tmp_path, [CT_TO_CAD], {"cad": cad.port}).start()
    cleanup(node)
    good = node.config_path.read_text()
    node.config_path.write_text(good.replace('destinations = ["cad"]', 'destinations = ["gone"]'))
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    [failed] = node.wait_for_event("config_reload_failed")
    assert "gone" in failed["error"]

    ct = write_ct(tmp_path / "in" / "ct.dcm")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MR2NST")
    assert assoc.is_established
    assert int(assoc.send_c_store(ct).Status) == 0
    assoc.release()
    wait_for(lambda: len(cad.files()) == 1, 30, "the CT at the CAD, by the old route")
    assert node.proc.poll() is None

    # node.network_timeout_s is read at start only: applied after a restart.
    node.config_path.write_text(good.replace("network_timeout_s = 10", "network_timeout_s = 11"))
    out = node.cli("config", "reload")
    assert out.returncode == 0, out.stderr
    assert "restart to apply: node" in out.stdout
    assert node.stop() == 0
