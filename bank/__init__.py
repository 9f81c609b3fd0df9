"""mr2nst.bank: the reference image bank (target-domain UIH references, selection, statistics)."""
