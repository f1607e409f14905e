"""The volumes of the preprocessed dataset (``data/processed/cases``) on disk.

Its own module, so that what reads no preprocessed data (the exported package, the DICOM node)
does not need Blosc2.
"""

from __future__ import annotations

from pathlib import Path

import blosc2
import numpy as np

from ctpipe.fileio import atomic_path

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
