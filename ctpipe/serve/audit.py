"""The audit trail: one JSON object per line, appended, never rewritten (IHE ATNA's who / what /
where, without PHI). Fields are documented in docs/serving.md ("Audit log").

Every event has ``time`` (UTC, ISO 8601), ``event`` and ``outcome``; the others depend on the
event: ``protocol``, ``calling_ae``, ``peer`` (address of the other side), ``token`` (name of the
API token), ``job``, ``study`` / ``series`` (SHA-256 tags, never the UIDs), ``model_version``,
``destination``, ``attempt``, ``reason``, ``instances``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path

EVENTS = ("association", "request", "job", "send", "retention", "start")


class Audit:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_APPEND: each write lands at the end, whoever else appends; owner-only.
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.lock = threading.Lock()

    def __call__(self, event: str, outcome: str, **fields: object) -> None:
        assert event in EVENTS, event
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        line = {"time": now, "event": event, "outcome": outcome}
        line.update({k: v for k, v in fields.items() if v is not None})
        data = (json.dumps(line, sort_keys=True, default=str) + "\n").encode()
        with self.lock:
            os.write(self.fd, data)
            os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
