"""The one structlog setup: console rendering on a terminal, JSON lines otherwise."""

from __future__ import annotations

import logging
import sys

import structlog

from common.progress import clear_live_line


def _clear_live_line(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    # a log line written after a live progress line would otherwise continue it
    clear_live_line()
    return event


def configure(level: str = "info", stream: object = None) -> None:
    out = stream if stream is not None else sys.stderr
    renderer: structlog.typing.Processor
    if getattr(out, "isatty", lambda: False)():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            _clear_live_line,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
