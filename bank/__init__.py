"""mr2nst.bank: the reference image bank (target-domain UIH references, selection, statistics).

Modules: ``bank`` (the Bank facade), ``ingest`` (one DICOM file to an entry),
``manifest`` (on-disk layout), ``selection``, ``stats`` (domain statistics) and
``dicom_image`` (reading mammogram DICOMs, shared with the node).
"""
