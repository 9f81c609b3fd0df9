"""The SOP classes this node normalizes and the transfer syntaxes it accepts and writes.

Every accepted transfer syntax is one that :func:`mr2nst.node.dicom.pixels.decode` can decode
with pydicom's own handlers (native and deflated data, RLE) or the installed pylibjpeg
plugins (pylibjpeg-openjpeg for JPEG 2000, pylibjpeg-libjpeg for the JPEG family and
JPEG-LS). The SCP offers exactly these in its presentation contexts.
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalMammographyXRayImageStorageForProcessing,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

#: Single-frame projection X-ray images the engine can normalize (MG and DX,
#: For Presentation and For Processing).
NORMALIZABLE_SOP_CLASSES: tuple[UID, ...] = (
    DigitalMammographyXRayImageStorageForPresentation,  # 1.2.840.10008.5.1.4.1.1.1.2
    DigitalMammographyXRayImageStorageForProcessing,  # 1.2.840.10008.5.1.4.1.1.1.2.1
    DigitalXRayImageStorageForPresentation,  # 1.2.840.10008.5.1.4.1.1.1.1
    DigitalXRayImageStorageForProcessing,  # 1.2.840.10008.5.1.4.1.1.1.1.1
)

#: Uncompressed (native) transfer syntaxes, in the SCP's order of preference (pynetdicom
#: accepts the first of its own list that a requestor proposes): explicit VR first, as DCMTK does.
NATIVE_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
)

#: Compressed transfer syntaxes that can be decoded here.
COMPRESSED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEG2000Lossless,  # pylibjpeg-openjpeg
    JPEG2000,  # lossless or lossy; pylibjpeg-openjpeg
    JPEGLossless,  # process 14; pylibjpeg-libjpeg
    JPEGLosslessSV1,  # process 14, selection value 1; pylibjpeg-libjpeg
    JPEGLSLossless,  # pylibjpeg-libjpeg
    JPEGLSNearLossless,  # pylibjpeg-libjpeg
    RLELossless,  # pydicom's own RLE handler (or pylibjpeg-rle)
    JPEGBaseline8Bit,  # lossy; pylibjpeg-libjpeg or Pillow
    JPEGExtended12Bit,  # lossy; pylibjpeg-libjpeg or Pillow
)

#: Everything the SCP accepts for the normalizable SOP classes.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    NATIVE_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES
)

#: Transfer syntaxes whose encoding always discards information.
ALWAYS_LOSSY_TRANSFER_SYNTAXES: frozenset[UID] = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})

#: Transfer syntaxes that may or may not have been used lossily (JPEG 2000 with the
#: irreversible transform or truncated layers, JPEG-LS with NEAR > 0). An instance in one of
#: these is taken as lossy unless it says LossyImageCompression "00" itself.
MAYBE_LOSSY_TRANSFER_SYNTAXES: frozenset[UID] = frozenset({JPEG2000, JPEGLSNearLossless})

#: The value of LossyImageCompressionMethod (0028,2114) for each lossy-capable syntax.
LOSSY_METHOD: dict[UID, str] = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEG2000: "ISO_15444_1",
    JPEGLSNearLossless: "ISO_14495_1",
}

#: Derived instances are written uncompressed as Explicit VR Little Endian: every storage
#: SCP must accept it for these SOP classes, the encoding is exact, and it never adds a
#: lossy step. (The SCU may still negotiate Implicit VR Little Endian with a peer that
#: offers nothing better; pynetdicom re-encodes the dataset for that context.)
OUTPUT_TRANSFER_SYNTAX: UID = ExplicitVRLittleEndian


def is_normalizable(sop_class_uid: str) -> bool:
    """Whether instances of ``sop_class_uid`` can go through the engine."""
    return sop_class_uid in NORMALIZABLE_SOP_CLASSES


def is_accepted_syntax(transfer_syntax_uid: str) -> bool:
    """Whether ``transfer_syntax_uid`` is one this node accepts and can decode."""
    return transfer_syntax_uid in ACCEPTED_TRANSFER_SYNTAXES
