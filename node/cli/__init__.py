"""The ``mr2nst`` command line: the composition root, one module per command."""
