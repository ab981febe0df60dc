"""structlog setup: readable lines on a terminal, JSON lines otherwise (journald, files)."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import structlog

from daemon.config import LogSettings

#: the settings of the last `configure_logging` (a model process logs alike)
configured = LogSettings()


#: C0 and C1 control characters and DEL: a terminal would act on them
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _picture(found: re.Match[str]) -> str:
    """A control character's Unicode picture (␛ for ESC, ␊ for a line feed, ␡ for DEL);
    the C1 ones, which have none, as the replacement character."""
    code = ord(found[0])
    return chr(0x2400 + code) if code < 0x20 else "\u2421" if code == 0x7F else "\ufffd"


def escape_control_characters(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """Readable lines: control characters in text values (an alert id carrying a terminal's
    escape sequences, which could erase or fake lines) shown as their pictures, inert.
    JSON escapes them itself, and other values are shown by their repr, which does."""
    for key, value in event.items():
        if isinstance(value, str) and _CONTROL.search(value):
            event[key] = _CONTROL.sub(_picture, value)
    return event


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
            *([] if use_json else [escape_control_characters]),
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
                *(
                    [structlog.processors.format_exc_info]
                    if use_json
                    else [escape_control_characters]
                ),
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
