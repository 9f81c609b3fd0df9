"""mr2nst.core: the transfer engine as pure array/tensor code (no DICOM, files or network)."""
