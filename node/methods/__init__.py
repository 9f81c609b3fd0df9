"""Normalization methods behind one registry: ehm, spectral, mr2nst (and passthrough from core)."""
