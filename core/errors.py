"""Domain exceptions of the core package."""


class CoreError(Exception):
    """Base class for engine errors."""


class ImageError(CoreError):
    """An input array is not a usable image (wrong shape, dtype or range)."""
