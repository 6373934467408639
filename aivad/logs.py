"""Logging setup: one event per line on stderr, as text or as JSON.

One line per event because the consumers are line-based: journald stores each
line as an entry, and log shippers split on newlines. A traceback therefore
never spans lines: in text it is a quoted ``exc="…"`` field with ``\\n``
escapes, in JSON the ``exc`` string.

Text (for people)::

    2026-11-23T10:00:00.123Z INFO aivad.store: committed batch rows=100 last_seq=4711

JSON (for machines), ``extra={…}`` keys at the top level (a key that clashes
with a fixed one is prefixed ``extra_``)::

    {"ts": "2026-11-23T10:00:00.123Z", "level": "INFO", "logger": "aivad.store",
     "msg": "committed batch", "rows": 100, "last_seq": 4711}

Under systemd (``JOURNAL_STREAM`` names our stderr), text lines start with a
syslog priority prefix such as ``<6>``; journald strips it and records the
priority, so ``journalctl -p warning`` works. JSON lines get no prefix, so a
pipe into a JSON parser works the same everywhere.

Stdlib logging only; no third-party handler is needed for this.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Literal, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "Throttle", "configure_logging", "set_level"]

LogFormat = Literal["text", "json"]

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

_JSON_KEYS = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})

# syslog priorities by logging level, for journald's SyslogLevelPrefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

_HANDLER_NAME = "aivad"


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 UTC with milliseconds: sorts as text, no timezone guessing."""
    seconds = int(record.created)
    millis = int((record.created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


def _logfmt_value(value: Any) -> str:
    """Bare when unambiguous, else a JSON string (quotes, escapes, no newline)."""
    text = value if isinstance(value, str) else _json_scalar(value)
    if text and not any(c.isspace() or c in '"=\\' for c in text) and text.isprintable():
        return text
    return json.dumps(text, ensure_ascii=False)


def _json_scalar(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _single_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE key=value … exc="…"``, one line."""

    def __init__(self, *, syslog_prefix: bool = False) -> None:
        super().__init__()
        self._syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, f"{record.name}:", _single_line(record.getMessage())]
        parts += [f"{key}={_logfmt_value(value)}" for key, value in _extras(record).items()]
        if record.exc_info:
            parts.append(f"exc={_logfmt_value(self.formatException(record.exc_info))}")
        elif record.exc_text:
            parts.append(f"exc={_logfmt_value(record.exc_text)}")
        if record.stack_info:
            parts.append(f"stack={_logfmt_value(self.formatStack(record.stack_info))}")
        line = " ".join(parts)
        if self._syslog_prefix:
            line = f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extras, exc/stack if any."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            event[f"extra_{key}" if key in _JSON_KEYS else key] = value
        if record.exc_info:
            event["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            event["exc"] = record.exc_text
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, ensure_ascii=False, default=str)


def _level(level: str) -> int:
    try:
        return _LEVELS[level.upper()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; one of {', '.join(_LEVELS)}") from None


def _is_journal(stream: TextIO) -> bool:
    """True when ``stream`` is the journald stream systemd connected (JOURNAL_STREAM=dev:ino)."""
    raw = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = raw.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not backed by a file descriptor
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def configure_logging(
    level: str, fmt: LogFormat, *, stream: TextIO | None = None, capture_warnings: bool = True
) -> None:
    """Install the one root handler writing ``fmt`` lines to stderr at ``level``.

    Calling it again replaces the handler this module installed (other handlers,
    e.g. pytest's, are left alone). ``stream`` is for tests; default stderr.
    ``capture_warnings`` routes Python warnings into logging so they too are
    one line each (tests turn it off: it replaces a process-wide hook).
    Raises ValueError on an unknown level or format.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}; one of 'text', 'json'")
    numeric = _level(level)
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(syslog_prefix=_is_journal(out)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    if capture_warnings:
        logging.captureWarnings(True)


class Throttle:
    """Log lines of one kind at most once per ``interval_s``; the next one says how many were held back.

    For lines a peer can cause at will (refused tokens): a flood must not fill the journal.
    """

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += " (and %d more like it held back)"
            args = (*args, held)
        self._log.warning(msg, *args)


def set_level(level: str) -> None:
    """Change the root level at runtime (config reload). Raises ValueError on an unknown level."""
    logging.getLogger().setLevel(_level(level))
