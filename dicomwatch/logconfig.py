"""Logging is configured here, and only from the command-line entry point.

Under systemd (``JOURNAL_STREAM`` names our stderr) journald stamps every line itself,
so we print no timestamp of our own and prefix each line with its syslog priority
(``<6>``), which journald turns into the entry's priority: ``journalctl -p warning``
then shows only problems.  JSON lines carry the same result record as the text, and
the same prefix under journald (journald strips it, so the stored message is the JSON).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from dicomwatch.result import Result, render_text

RESULTS_LOGGER = "dicomwatch.results"

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def under_journald(stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd connected us to."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def _one_line(message: str) -> str:
    """Escape line breaks and other unprintable characters a message may carry.

    Messages quote file names from the inbox, and a sender chooses those: a name holding
    a newline would otherwise end the line and forge the next one (under journald a whole
    entry with its own priority).
    """
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class TextFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        result = getattr(record, "result", None)
        text = render_text(result) if isinstance(result, Result) else _one_line(record.getMessage())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journald:
            prio = _priority(record)
            return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])
        stamp = datetime.now().astimezone().isoformat(timespec="milliseconds")
        return f"{stamp} {record.levelname:<7} {text}"


def _priority(record: logging.LogRecord) -> int:
    return _PRIORITY.get(record.levelno, 6)


class JsonFormatter(logging.Formatter):
    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        result = getattr(record, "result", None)
        if isinstance(result, Result):
            payload: dict[str, Any] = {"event": "file", **result.as_dict()}
        else:
            payload = {"event": getattr(record, "event", "log"), "msg": record.getMessage()}
            fields = getattr(record, "fields", None)
            if isinstance(fields, dict):
                payload.update(fields)
        payload = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            **payload,
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        line = json.dumps(payload, ensure_ascii=False, default=str)
        # json.dumps escapes every line break: one record is always one line.
        return f"<{_priority(record)}>{line}" if self.journald else line


_HANDLER_NAME = "dicomwatch"


def setup_logging(fmt: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """(Re)configure the root logger; called at start and again on a config reload.

    Only the handler installed here is replaced: a handler someone else put on the root
    logger (an embedding program, a test's log capture) survives a reload.
    """
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    journald = under_journald(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(journald))
    else:
        handler.setFormatter(TextFormatter(journald))
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def log_result(result: Result) -> None:
    """The one line per file; failures that will be retried are warnings."""
    logger = logging.getLogger(RESULTS_LOGGER)
    level = logging.WARNING if result.outcome.value in ("failed", "quarantined") else logging.INFO
    logger.log(level, "%s", _Rendered(result), extra={"result": result})


class _Rendered:
    """The text of a result, rendered only if a handler asks for the plain message.

    Both formatters here render the attached result themselves; rendering it up front
    as well cost the daemon and ``sort`` a second rendering of every line."""

    __slots__ = ("result",)

    def __init__(self, result: Result) -> None:
        self.result = result

    def __str__(self) -> str:
        return render_text(self.result)
