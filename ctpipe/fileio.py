"""Atomic writes: an interrupted stage never leaves a half-written file for DVC to cache."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def umask() -> int:
    """The process's umask, read without changing it (Linux ``/proc``; 0o022 elsewhere): the
    DICOM node runs with 077, and what it writes stays owner-only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; outputs follow the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON (stable bytes for DVC hashes)."""
    with atomic_path(path) as tmp:
        tmp.write_text(
            json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n",
            encoding="utf-8",
        )


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_csv(path: str | Path, frame: Any) -> None:
    """Write a pandas DataFrame without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def rounded(metrics: dict[str, Any], ndigits: int = 4) -> dict[str, Any]:
    """Round floats in a (nested) metrics dict so ``dvc metrics diff`` stays readable."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out[key] = rounded(value, ndigits)
        elif isinstance(value, (float, np.floating)):
            out[key] = round(float(value), ndigits)
        else:
            out[key] = value
    return out
