"""The registry of normalization methods available to routes (``method = ...``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mr2nst.core.method import Method, Passthrough
from mr2nst.node.config import Config
from mr2nst.node.errors import ConfigError
from mr2nst.node.version import VERSION

if TYPE_CHECKING:
    from mr2nst.core.engine import Progress

MethodFactory = Callable[[Config], Method]


def _ehm(config: Config) -> Method:
    """The ``ehm`` method on the configured bank."""
    from mr2nst.bank.bank import Bank
    from mr2nst.node.methods.ehm import EhmMethod

    return EhmMethod(
        Bank(config.bank.path), config.methods.references, config.bank.allow_fewer, VERSION
    )


def _spectral(config: Config) -> Method:
    """The ``spectral`` method on the configured bank, with the ``[spectral]`` settings."""
    from mr2nst.bank.bank import Bank
    from mr2nst.node.methods.spectral import SpectralMethod

    return SpectralMethod(
        Bank(config.bank.path),
        config.methods.references,
        config.bank.allow_fewer,
        VERSION,
        config.spectral.core(),
    )


def _mr2nst(config: Config, device: str | None = None) -> Method:
    """The ``mr2nst`` method: the engine (weights verified, refiner loaded) on ``device``.

    Raises:
        WeightsError: the weights file is missing or corrupt.
        EngineConfigError: the refiner was trained for other settings.
    """
    from mr2nst.bank.bank import Bank
    from mr2nst.core.engine import Mr2nstEngine
    from mr2nst.node.methods.mr2nst import Mr2nstMethod
    from mr2nst.node.methods.weights import ensure_weights

    weights = ensure_weights(config.engine)
    core = replace(
        config.engine.core(), weights=weights or "", device=device or config.engine.device
    )
    refiner = config.engine.refiner or None
    engine = Mr2nstEngine(core, refiner=refiner)
    return Mr2nstMethod(
        engine,
        Bank(config.bank.path),
        config.methods.references,
        config.bank.allow_fewer,
        VERSION,
        refiner_name=Path(refiner).name if refiner else "",
    )


def _fast(config: Config, device: str | None = None) -> Method:
    """The ``fast`` method: the student of ``[fast] checkpoint``, checked against the
    ``mr2nst`` method that this config defines (its teacher).

    Raises:
        ConfigError: no checkpoint is set, it cannot be read, or it was trained for
            another teacher (engine settings, weights, refiner, references or bank).
        WeightsError: the teacher's feature weights are missing or corrupt.
    """
    from mr2nst.core.engine import resolved_device
    from mr2nst.node.methods.fast import fast_method
    from mr2nst.node.methods.mr2nst import Mr2nstMethod

    path = config.fast.checkpoint
    if not path:
        raise ConfigError(
            "fast.checkpoint: not set, but method fast is used (train a student first: "
            "mr2nst train-fast --source GE_DIR --config FILE --out fast.pt)"
        )
    teacher = _mr2nst(config, device="cpu")  # built for its fingerprint, then dropped
    assert isinstance(teacher, Mr2nstMethod)
    where = device or str(resolved_device(config.engine.core()))
    method, _ = fast_method(path, teacher, tile=config.fast.tile, device=where)
    return method


def _cyclegan(config: Config, device: str | None = None) -> Method:
    """The ``cyclegan`` method: the generator of ``[cyclegan] checkpoint`` on the configured
    bank, its output mapped with ``[engine] tone`` (no feature network is loaded).

    Raises:
        ConfigError: no checkpoint is set, or it cannot be read or does not fit.
    """
    from mr2nst.bank.bank import Bank
    from mr2nst.core.engine import resolved_device
    from mr2nst.node.methods.cyclegan import cyclegan_method

    path = config.cyclegan.checkpoint
    if not path:
        raise ConfigError(
            "cyclegan.checkpoint: not set, but method cyclegan is used (train one first: "
            "mr2nst train-cyclegan --source GE_DIR --target UIH_DIR --out cyclegan.pt)"
        )
    core = config.engine.core()
    where = device or str(resolved_device(core))
    method, _ = cyclegan_method(
        path,
        core,
        Bank(config.bank.path),
        config.methods.references,
        config.bank.allow_fewer,
        VERSION,
        tile=config.cyclegan.tile,
        device=where,
    )
    return method


FACTORIES: dict[str, MethodFactory] = {
    "passthrough": lambda config: Passthrough(engine_version=VERSION),
    "ehm": _ehm,
    "spectral": _spectral,
    "mr2nst": _mr2nst,
    "fast": _fast,
    "cyclegan": _cyclegan,
}


def check_methods(config: Config) -> None:
    """Config error when a route names a method this build does not provide."""
    for index, route in enumerate(config.routes):
        if route.action == "normalize" and route.method not in FACTORIES:
            raise ConfigError(
                f"routes[{index}].method: {route.method!r} is not available in mr2nst {VERSION} "
                f"(available: {', '.join(sorted(FACTORIES))})"
            )


def uses_engine(config: Config) -> bool:
    """Whether a route runs the ``mr2nst`` method (so the engine and its weights matter)."""
    return any(r.action == "normalize" and r.method == "mr2nst" for r in config.routes)


def uses_fast(config: Config) -> bool:
    """Whether a route runs the ``fast`` method (so its checkpoint must fit the teacher)."""
    return any(r.action == "normalize" and r.method == "fast" for r in config.routes)


def check_fast(config: Config) -> None:
    """Load the ``fast`` student once and check it against its teacher, so that a missing,
    corrupt or mismatched checkpoint stops the node at start (exit 2) with a reason.

    Raises:
        ConfigError: the checkpoint is missing, unreadable or trained for another teacher.
        WeightsError: the teacher's feature weights are missing or corrupt.
    """
    _fast(config, device="cpu")


def uses_cyclegan(config: Config) -> bool:
    """Whether a route runs the ``cyclegan`` method (so its checkpoint must load)."""
    return any(r.action == "normalize" and r.method == "cyclegan" for r in config.routes)


def check_cyclegan(config: Config) -> None:
    """Load the ``cyclegan`` generator once, so that a missing, corrupt or foreign
    checkpoint stops the node at start (exit 2) with a reason.

    Raises:
        ConfigError: the checkpoint is not set, missing, unreadable or does not fit.
    """
    _cyclegan(config, device="cpu")


def check_engine(config: Config) -> None:
    """Build the mr2nst method once on the CPU, so that a bad setup stops the node at start.

    Missing weights, a refiner trained for other settings or bad engine settings then stop
    the node with a reason instead of failing every job.

    Raises:
        WeightsError: the weights file is missing or corrupt.
        EngineConfigError: the engine's settings or its refiner are unusable.
    """
    _mr2nst(config, device="cpu")


class MethodCache:
    """Builds each method once per process (an engine loads its weights once) and reuses it.

    ``progress`` is handed to methods that report progress (the mr2nst engine).
    """

    def __init__(self, config: Config, progress: Callable[[Progress], None] | None = None) -> None:
        self._config = config
        self._progress = progress
        self._methods: dict[str, Method] = {}

    def get(self, name: str) -> Method:
        """The method ``name``, built on first use.

        Raises:
            ConfigError: no such method.
        """
        if name not in self._methods:
            factory = FACTORIES.get(name)
            if factory is None:
                raise ConfigError(f"method {name!r} is not available")
            method = factory(self._config)
            if self._progress is not None and hasattr(method, "progress"):
                method.progress = self._progress
            self._methods[name] = method
        return self._methods[name]
