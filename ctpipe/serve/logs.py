"""The node's log lines: text for a terminal, or JSON lines for a cluster's log collector.

``log_format: json`` (serve.yaml) or ``--log-format json`` writes one JSON object per line,
the format Fluentd, Loki and Logstash take without parsing rules::

    {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "ctpipe.serve",
     "role": "all", "job": "0001738...-a1b2c3", "event": "job 0001738...-a1b2c3 predicted ..."}

No PHI: the node's messages name jobs and tags, never UIDs or header values. Each event and
exception goes through :func:`ctpipe.serve.telemetry.redact` as well, and an exception is written
as its type, its redacted message and the frames of its traceback (file, line, function), never
the source lines or the values of the data it was handling.
"""

from __future__ import annotations

import json
import logging
import traceback
from datetime import UTC, datetime
from typing import Literal

from ctpipe.serve.telemetry import redact

LogFormat = Literal["text", "json"]
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EVENT_LIMIT = 2000  # characters of one event; a message never needs more
HANDLER = "ctpipe.serve"  # the name of the handler setup() adds
JOB_PREFIX = "job %s"  # the node's convention: a line about a job starts with its id


def safe_exception(exc_info) -> str:
    """An exception as logs show it: type, redacted message and the traceback's frames."""
    kind, err, tb = exc_info
    frames = [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(tb)]
    name = getattr(kind, "__name__", str(kind))
    return redact(f"{name}: {err}", EVENT_LIMIT) + "".join(f"\n  at {f}" for f in frames)


def job_of(record: logging.LogRecord) -> str | None:
    """The job a record concerns: ``extra={"job": id}``, or the first argument of a message
    that starts with ``job %s`` (how the runner names jobs)."""
    job = getattr(record, "job", None)
    if job is None and isinstance(record.msg, str) and record.msg.startswith(JOB_PREFIX):
        args = record.args if isinstance(record.args, tuple) else ()
        job = args[0] if args else None
    return None if job is None else str(job)


class TextFormatter(logging.Formatter):
    """The default ``time LEVEL logger: message`` lines, redacted as the JSON ones are."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return redact(super().formatMessage(record), EVENT_LIMIT)

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return safe_exception(ei)

    def format(self, record: logging.LogRecord) -> str:
        cached = record.exc_text  # another handler's traceback text would skip formatException
        record.exc_text = None
        try:
            return super().format(record)
        finally:
            record.exc_text = cached


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, role, job, event."""

    def __init__(self, role: str = "all") -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        entry = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "role": self.role,
            "event": redact(record.getMessage(), EVENT_LIMIT),
        }
        job = job_of(record)
        if job is not None:
            entry["job"] = job
        if record.exc_info:
            entry["error"] = safe_exception(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(log_format: LogFormat = "text", role: str = "all") -> None:
    """The root logger writes to stderr in ``log_format``. A handler that an earlier call added
    is replaced (the format can change once the config file is read); others are left alone."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(role) if log_format == "json" else TextFormatter(TEXT))
    handler.set_name(HANDLER)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
