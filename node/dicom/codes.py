"""Coded entries (DICOM PS3.3 §8.8) used in the derived series and the phantoms."""

from __future__ import annotations

from pydicom.dataset import Dataset


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """One coded-entry item (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
