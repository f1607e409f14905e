"""Atomic writes: an interrupted stage never leaves a half-written file for DVC to cache; and the
format of the preprocessed volumes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import blosc2
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


# Preprocessed volumes are chunked, losslessly compressed Blosc2 arrays (``.b2nd``), as nnU-Net v2
# stores its preprocessed data: a float16 CT compresses to about two thirds (its noise is
# incompressible), a nodule mask to almost nothing, and a patch decompresses only the chunks it
# touches. Chunks of 16 slices x 64 x 64 serve a slab along any view; one thread, because Blosc2's
# bytes depend on the thread count and DVC hashes them.
VOLUME_CHUNKS = (16, 64, 64)
VOLUME_BLOCKS = (4, 32, 32)
VOLUME_CPARAMS = {
    "codec": blosc2.Codec.ZSTD,
    "clevel": 5,
    "filters": [blosc2.Filter.SHUFFLE],
    "nthreads": 1,
}


def write_volume(path: str | Path, array: np.ndarray) -> None:
    """Write a 3D array as a compressed, chunked ``.b2nd`` file (read it with :func:`open_volume`)."""
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise ValueError(f"{path}: a volume has 3 axes, got shape {array.shape}")
    chunks = tuple(min(c, s) or 1 for c, s in zip(VOLUME_CHUNKS, array.shape))
    blocks = tuple(min(b, c) for b, c in zip(VOLUME_BLOCKS, chunks))
    with atomic_path(path) as tmp:
        blosc2.asarray(
            array, chunks=chunks, blocks=blocks, urlpath=str(tmp), mode="w", cparams=VOLUME_CPARAMS
        )


def case_files(processed: str | Path, case_id: str) -> tuple[Path, Path]:
    """The image and label volumes of one case of a preprocessed dataset (``data/processed``;
    layout in :mod:`ctpipe.model.data`)."""
    base = Path(processed) / "cases"
    return base / f"{case_id}.image.b2nd", base / f"{case_id}.label.b2nd"


def open_volume(path: str | Path) -> blosc2.NDArray:
    """A ``.b2nd`` volume, opened read-only: slicing it (``vol[a:b, c:d]``) decompresses only the
    chunks the slice touches and returns a NumPy array; ``vol[:]`` the whole volume.

    Raises:
        ValueError: the file is not a Blosc2 array, naming it.
    """
    try:
        return blosc2.open(str(path), mode="r")
    except FileNotFoundError:
        raise
    except Exception as e:  # Blosc2 raises RuntimeError or ValueError on a damaged file
        raise ValueError(f"{path}: not a readable Blosc2 volume ({e})") from e


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
