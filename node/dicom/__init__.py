"""DICOM objects.

Pixel I/O, the derived series, SOP classes and syntaxes, status codes, the SCU, IOD checks.
"""
