"""The registry of normalization methods available to routes (``method = ...``)."""

from __future__ import annotations

from collections.abc import Callable

from mr2nst.core.method import Method, Passthrough

from .config import Config
from .errors import ConfigError
from .version import VERSION

MethodFactory = Callable[[Config], Method]

def _ehm(config: Config) -> Method:
    from mr2nst.bank.bank import Bank

    from .method_ehm import EhmMethod

    return EhmMethod(Bank(config.bank.path), config.engine.references, config.bank.allow_fewer, VERSION)


# mr2nst (the engine issue) registers here when it lands.
FACTORIES: dict[str, MethodFactory] = {
    "passthrough": lambda config: Passthrough(engine_version=VERSION),
    "ehm": _ehm,
}


def check_methods(config: Config) -> None:
    """Config error when a route names a method this build does not provide."""
    for index, route in enumerate(config.routes):
        if route.action == "normalize" and route.method not in FACTORIES:
            raise ConfigError(
                f"routes[{index}].method: {route.method!r} is not available in mr2nst {VERSION} "
                f"(available: {', '.join(sorted(FACTORIES))})"
            )


class MethodCache:
    """Builds each method once per process (an engine loads its weights once) and reuses it."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._methods: dict[str, Method] = {}

    def get(self, name: str) -> Method:
        if name not in self._methods:
            factory = FACTORIES.get(name)
            if factory is None:
                raise ConfigError(f"method {name!r} is not available")
            self._methods[name] = factory(self._config)
        return self._methods[name]
