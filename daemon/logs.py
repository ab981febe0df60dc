"""structlog setup: readable lines on a terminal, JSON lines otherwise (journald, files)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from daemon.config import LogSettings

#: the settings of the last `configure_logging` (a model process logs alike)
configured = LogSettings()


def configure_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    global configured
    configured = settings
    stream = stream or sys.stderr
    use_json = settings.format == "json" or (settings.format == "auto" and not stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
        )
    )
    level = getattr(logging, settings.level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # libraries log through the standard library: warnings and worse only, rendered like
    # the daemon's own lines (one JSON object each under journald)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # a library's traceback as text (JSON would show the exception's parts' reprs)
                *([structlog.processors.format_exc_info] if use_json else []),
                renderer,
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    # huggingface_hub prints its own warnings (download retries): once is enough
    logging.getLogger("huggingface_hub").propagate = False
    # download/loading progress bars are noise in a service log
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
