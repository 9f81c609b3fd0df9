"""Domain exceptions of the bank package."""


class BankError(Exception):
    """Base class for bank errors."""


class PixelError(BankError):
    """Pixel data cannot be decoded or is not a usable image (permanent for that instance)."""


class UnsupportedImageError(PixelError):
    """The instance is not a single-frame monochrome image that can be processed."""


class RejectedFile(BankError):
    """A file offered to the bank is not a usable reference; the message says why."""


class NotEnoughReferences(BankError):
    """Fewer same-view references exist than requested."""


class BankCorrupt(BankError):
    """The bank's manifest or files are unreadable or inconsistent."""
