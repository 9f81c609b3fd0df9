"""Domain exceptions of the node package."""


class NodeError(Exception):
    """Base class for node errors."""


class ConfigError(NodeError):
    """The configuration is invalid; the message names the key."""


class PixelError(NodeError):
    """The pixel data cannot be decoded or is not a usable image (permanent)."""


class UnsupportedImageError(PixelError):
    """The instance is not an image the method can process (permanent)."""


class LedgerError(NodeError):
    """The ledger cannot be opened or is at an unknown schema version."""


class SpoolError(NodeError):
    """A durable write to the spool or outbox failed."""
