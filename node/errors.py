"""Domain exceptions of the node package."""

from mr2nst.bank import errors as _bank_errors


class NodeError(Exception):
    """Base class for node errors."""


class UsageError(Exception):
    """Bad command-line usage: the command exits 2 with this one-line message."""


class ConfigError(NodeError):
    """The configuration is invalid; the message names the key."""


# Pixel errors are shared with the bank, which reads DICOM images too.
PixelError = _bank_errors.PixelError
UnsupportedImageError = _bank_errors.UnsupportedImageError


class LedgerError(NodeError):
    """The ledger cannot be opened or is at an unknown schema version."""


class SpoolError(NodeError):
    """A durable write to the spool or outbox failed."""


class SafetyGateError(NodeError):
    """A method's output failed the safety gate; it must not be sent.

    Args:
        code: the failed check, e.g. ``safety.mask_overlap`` (a metric label).
        detail: what was measured, for the ledger and the log.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
