"""structlog configuration: the one place logging is set up (called by the CLI).

JSON lines when stderr is not a TTY (or ``format = "json"``), a console renderer on a
TTY. Per-instance context (job_id, study_uid, series_uid, sop_uid, calling_ae, route)
travels through contextvars. pynetdicom's stdlib logging is rendered by the same
processors, and so are Python ``warnings`` (pydicom) and every library logger. Keys that
would carry PHI are removed from every event.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import structlog
from structlog.contextvars import bound_contextvars, merge_contextvars
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

# Never logged, whatever a caller passes.
PHI_KEYS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "accession_number",
    }
)

CONTEXT_KEYS = ("job_id", "study_uid", "series_uid", "sop_uid", "calling_ae", "route")


def drop_phi(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """Processor: remove any PHI-named key from the event.

    Args:
        _logger: the wrapped logger (unused).
        _name: the name of the method called (unused).
        event_dict: the event.

    Returns:
        The event without any key of :data:`PHI_KEYS`.
    """
    for key in PHI_KEYS.intersection(event_dict):
        del event_dict[key]
    return event_dict


def _shared_processors() -> list[Processor]:
    """The processors of structlog events and of stdlib (pynetdicom) records alike."""
    return [
        merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_phi,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and stdlib logging (pynetdicom) once for this process.

    Args:
        fmt: ``json``, ``console``, or ``auto`` (JSON unless ``stream`` is a TTY).
        level: the lowest level logged (``debug``, ``info``, ``warning``, ``error``).
        stream: where log lines go (default: stderr).
    """
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Processor = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared = _shared_processors()

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Python warnings (pydicom's UserWarnings) become records of the "py.warnings" logger,
    # rendered like every other line instead of raw text on stderr.
    logging.captureWarnings(True)
    # Library loggers that installed their own handlers (raw text) hand their records to
    # the root handler instead.
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger) and logger.handlers:
            logger.handlers[:] = []
            logger.propagate = True
    # pynetdicom is chatty at INFO (one line per PDU event); keep it at WARNING unless debugging.
    logging.getLogger("pynetdicom").setLevel(
        numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # dicomweb-client logs one INFO line per STOW request; the forwarder logs its own.
    logging.getLogger("dicomweb_client").setLevel(max(numeric, logging.WARNING))


def get_logger(name: str) -> FilteringBoundLogger:
    """The logger of one module, named ``name`` for stdlib logging.

    :func:`configure_logging` makes every logger a level-filtering bound logger (and so
    is structlog's default configuration, used before it runs).
    """
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger


@contextmanager
def instance_context(**values: object) -> Iterator[None]:
    """Bind per-instance context (only the known keys) for the duration of a block.

    Args:
        values: some of :data:`CONTEXT_KEYS`; None values are not bound.

    Raises:
        ValueError: a key is not one of :data:`CONTEXT_KEYS`.
    """
    unknown = set(values) - set(CONTEXT_KEYS)
    if unknown:
        raise ValueError(f"unknown context keys: {sorted(unknown)}")
    with bound_contextvars(**{k: v for k, v in values.items() if v is not None}):
        yield
