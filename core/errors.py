"""Domain exceptions of the core package."""


class CoreError(Exception):
    """Base class for engine errors."""


class ImageError(CoreError):
    """An input array is not a usable image (wrong shape, dtype or range)."""


class EngineConfigError(CoreError):
    """An engine setting is out of range; the message names the setting."""


class WeightsError(CoreError):
    """VGG19 weights are missing, corrupt or not the expected file. Never silently replaced."""


class RefinerError(CoreError):
    """A refiner checkpoint is unreadable or was trained for another engine setup."""
