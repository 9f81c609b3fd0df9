"""Fixtures shared by the node's method tests."""

import pytest
from support import uih_bank_files

from mr2nst.bank.bank import Bank


@pytest.fixture
def bank(tmp_path):
    """A bank of 8 phantom UIH references (2 per view and side)."""
    bank = Bank(tmp_path / "bank")
    report = bank.add([uih_bank_files(tmp_path / "uih", per_view_side=2)])
    assert len(report.added) == 8
    return bank
