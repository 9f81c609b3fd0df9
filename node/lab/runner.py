"""The evaluation's methods: built once, run on each source, timed, with their peak memory.

The mr2NST rows run the node's own :class:`~mr2nst.node.methods.mr2nst.Mr2nstMethod`;
the per-scale rows and the trained-refiner row reuse that same run (docs/evaluation.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from mr2nst.node.lab.scoring import Item

METHODS = (
    "passthrough",
    "ehm",
    "spectral",
    "nst_single",
    "mr2nst_1ref",
    "mr2nst",
    "mr2nst_s0",
    "mr2nst_s1",
    "mr2nst_s2",
)
TRAINED = "mr2nst_trained"
FAST = "fast"
CYCLEGAN = "cyclegan"
#: Methods that need no mr2NST engine of all grids.
_WITHOUT_FULL_ENGINE = {"passthrough", "ehm", "spectral", "nst_single", CYCLEGAN}

Image = npt.NDArray[np.float32]
#: One method's result on one source: (output in the common scale, seconds, peak MB).
Output = tuple[Image | None, float | None, float | None]


class PeakMemory:
    """Peak memory of a block: CUDA peak allocation, or the CPU process's RSS rise (sampled).

    Use as a context manager; ``mb`` holds the figure afterwards.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.mb = 0.0
        self._stop = threading.Event()
        self._base = self._peak = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        proc = psutil.Process()
        self._base = self._peak = proc.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(0.01):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        import psutil

        self._peak = max(self._peak, psutil.Process().memory_info().rss)
        self.mb = (self._peak - self._base) / 2**20


class Runner:
    """Builds the methods once and produces every method's output for one source.

    Args:
        config: the node config (engine, spectral and reference settings).
        bank: the reference bank the methods select from.
        methods: the names of :data:`METHODS` to produce.
        refiner_path: a trained refiner checkpoint: adds :data:`TRAINED`.
        fast_path: a fast student checkpoint: adds :data:`FAST` (checked against the mr2nst
            method built here, its teacher).
        cyclegan_path: a CycleGAN checkpoint (``mr2nst train-cyclegan``): adds
            :data:`CYCLEGAN` (its generator only: no mr2NST engine is needed for it).

    Raises:
        ConfigError: the student was trained for another teacher or bank, the CycleGAN
            checkpoint cannot be read, or ``engine.device`` names CUDA on a machine
            without it.
    """

    def __init__(
        self,
        config: Any,
        bank: Any,
        methods: tuple[str, ...],
        refiner_path: str | None = None,
        fast_path: str | None = None,
        cyclegan_path: str | None = None,
    ) -> None:
        import torch

        from mr2nst.core.engine import Mr2nstEngine, resolved_device
        from mr2nst.core.refiner import load_refiner
        from mr2nst.node.errors import ConfigError
        from mr2nst.node.methods.ehm import EhmMethod
        from mr2nst.node.methods.mr2nst import Mr2nstMethod
        from mr2nst.node.methods.spectral import SpectralMethod
        from mr2nst.node.methods.weights import ensure_weights
        from mr2nst.node.version import VERSION

        self.bank = bank
        self.methods = methods
        # The feature weights are verified (or downloaded) only for rows that run an engine.
        engine_rows = set(methods) - {"passthrough", "ehm", "spectral", CYCLEGAN}
        weights = ensure_weights(config.engine) if engine_rows else None
        self.core = replace(config.engine.core(), weights=weights or "")
        self.cuda = resolved_device(self.core).type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise ConfigError(
                f"engine.device = {config.engine.device!r}: no CUDA device is available here "
                '(use "auto" or "cpu")'
            )
        k = config.methods.references
        self.ehm = EhmMethod(bank, k, True, VERSION)
        self.spectral = SpectralMethod(bank, k, True, VERSION, config.spectral.core())
        self.mr2nst: Mr2nstMethod | None = None
        self.one_ref: Mr2nstMethod | None = None
        self.nst_single: Mr2nstMethod | None = None
        self.refiner: Any = None
        full = Mr2nstEngine(self.core) if set(methods) - _WITHOUT_FULL_ENGINE else None
        self._full = full
        if "nst_single" in methods:
            single = Mr2nstEngine(replace(self.core, grids=(1,)))
            self.nst_single = Mr2nstMethod(single, bank, 1, True, VERSION)
        if full is not None:
            self.mr2nst = Mr2nstMethod(full, bank, k, True, VERSION)
            self.mr2nst.keep_last = True  # the scale and trained rows reuse the same run
            self.one_ref = Mr2nstMethod(full, bank, 1, True, VERSION)
            if refiner_path:
                self.refiner = load_refiner(refiner_path, full.refiner_expectation()).eval()
        self.fast: Any = None
        self.fast_info: dict[str, Any] | None = None
        if fast_path:
            assert self.mr2nst is not None  # "fast" needs the full engine: its teacher
            self.fast, self.fast_info = _fast_method(self.mr2nst, fast_path, self.cuda)
        self.cyclegan: Any = None
        self.cyclegan_info: dict[str, Any] | None = None
        if cyclegan_path:
            self.cyclegan, self.cyclegan_info = _cyclegan_method(
                config, bank, cyclegan_path, self.cuda
            )

    def run(self, item: Item) -> dict[str, Output]:
        """Every method's output for one source.

        Returns:
            ``{method: (output in the common scale, seconds, peak MB)}`` for every name of
            ``methods``; None where not computable.
        """
        want = set(self.methods)
        out: dict[str, Output] = {}
        for name, fn in self._calls(item):
            if name in want or name == "mr2nst":  # mr2nst: the scale rows come from its run
                out[name] = self._timed(fn)
        if self.mr2nst is not None and self.mr2nst.last is not None:
            out.update(self._scale_rows())
            if self.refiner is not None:
                out[TRAINED] = self._trained_row(out["mr2nst"])
        return {name: out.get(name, (None, None, None)) for name in self.methods}

    def _calls(self, item: Item) -> list[tuple[str, Callable[[], Image]]]:
        """The methods to call, in order (``mr2nst`` last: its run is the one kept)."""
        calls: list[tuple[str, Callable[[], Image]]] = [
            ("passthrough", lambda: item.image.copy()),
            ("ehm", lambda: self.ehm(item.image, item.info).image),
            ("spectral", lambda: self.spectral(item.image, item.info).image),
        ]
        for name, method in (
            ("nst_single", self.nst_single),
            ("mr2nst_1ref", self.one_ref),
            (FAST, self.fast),
            (CYCLEGAN, self.cyclegan),
            ("mr2nst", self.mr2nst),
        ):
            if method is not None:
                calls.append((name, _call(method, item)))
        return calls

    def _timed(self, fn: Callable[[], Image]) -> tuple[Image, float, float]:
        with PeakMemory(self.cuda) as peak:
            started = time.perf_counter()
            value = fn()
            seconds = time.perf_counter() - started
        return value, seconds, peak.mb

    def _scale_rows(self) -> dict[str, Output]:
        """``mr2nst_s0/s1/s2``: the stitched scales of the last mr2nst run, in the bank's range."""
        assert self.mr2nst is not None and self.mr2nst.last is not None
        prepared, result = self.mr2nst.last
        rows: dict[str, Output] = {}
        for k in range(3):
            image = (
                self._to_target(result.scales[k], prepared.mask) if k < len(result.scales) else None
            )
            rows[f"mr2nst_s{k}"] = (image, None, None)
        return rows

    def _trained_row(self, base: Output) -> Output:
        """The last mr2nst run's scales merged by the trained refiner, finished like mr2nst.

        Its cost is the mr2nst run's plus the merge and finish.
        """
        assert self.mr2nst is not None and self.mr2nst.last is not None
        assert self._full is not None  # the engine of the mr2nst method
        method, engine = self.mr2nst, self._full
        prepared, result = self.mr2nst.last

        def trained() -> Image:
            unit = engine.merge(
                result.merge_inputs, prepared.start, prepared.mask, 0.0, self.refiner
            )
            return method.finish(unit, prepared, result).image

        image, seconds, mb = self._timed(trained)
        return (
            image,
            None if base[1] is None else base[1] + seconds,
            None if base[2] is None else max(base[2], mb),
        )

    def _to_target(self, image: Image, mask: npt.NDArray[np.bool_]) -> Image:
        """Engine [0, 1] image -> the bank's range, as Mr2nstMethod maps its merged output."""
        stats = self.bank.stats()
        out: Image = stats.low + np.clip(image, 0.0, 1.0) * np.float32(stats.high - stats.low)
        out[~mask] = np.float32(stats.background)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


def _fast_method(teacher: Any, path: str, cuda: bool) -> tuple[Any, dict[str, Any]]:
    """The ``fast`` method of the student at ``path``, checked against ``teacher``."""
    from mr2nst.node.methods.fast import fast_method

    method, checkpoint = fast_method(path, teacher, device="cuda" if cuda else "cpu")
    info = {
        "checkpoint": path,
        "teacher": checkpoint.teacher,
        "training": checkpoint.training,
        "parameters": checkpoint.student.parameter_count(),
    }
    return method, info


def _cyclegan_method(config: Any, bank: Any, path: str, cuda: bool) -> tuple[Any, dict[str, Any]]:
    """The ``cyclegan`` method of the generator at ``path`` on this run's bank."""
    from mr2nst.node.methods.cyclegan import cyclegan_method, parameter_count
    from mr2nst.node.version import VERSION

    method, checkpoint = cyclegan_method(
        path,
        config.engine.core(),
        bank,
        config.methods.references,
        True,
        VERSION,
        device="cuda" if cuda else "cpu",
    )
    info = {
        "checkpoint": path,
        "generator": checkpoint.config.as_dict(),
        "training": checkpoint.training,
        "parameters": parameter_count(checkpoint.g),
        "tone": method.engine.config.tone,
    }
    return method, info


def _call(method: Any, item: Item) -> Callable[[], Image]:
    """A call of a reference method on ``item`` that returns its output image."""

    def call() -> Image:
        image: Image = method(item.image, item.info).image
        return image

    return call
