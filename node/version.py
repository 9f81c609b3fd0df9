"""The installed version of mr2nst (one source: the package metadata)."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("mr2nst")
except PackageNotFoundError:  # running from a source tree that is not installed
    VERSION = "0+unknown"
