"""Crops around the segmentation's candidates and the candidate score, without PyTorch: what the
candidate classifier (:mod:`ctpipe.classifier`) is trained on and what ``predict`` feeds its ONNX
export with."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ctpipe.geometry import Geometry, world_to_array_index

MARGIN = 2  # voxels stored around a training crop on each side: the room of its random shifts


def crop_shape(spacing_xyz: Sequence[float], crop_mm: float) -> tuple[int, int, int]:
    """Voxels ``[k, j, i]`` of a cube of side ``crop_mm`` on a grid of ``spacing_xyz``, each a
    multiple of 4 (the network halves it twice), at least 8."""
    return tuple(max(8, 4 * math.ceil(crop_mm / float(s) / 4)) for s in reversed(list(spacing_xyz)))


def cut_crops(
    image: np.ndarray, geom: Geometry, xyz: np.ndarray, shape: Sequence[int], margin: int = 0
) -> np.ndarray:
    """Crops of ``image`` (``[k, j, i]``) centred on the world points ``xyz`` (``[n, 3]``, mm),
    each ``shape`` grown by ``margin`` voxels on every side, float16 ``[n, k, j, i]``. Outside the
    volume the crop holds the image's lowest value (air after the normalisation)."""
    size = np.asarray(shape, dtype=int) + 2 * margin
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    out = np.full((len(xyz), *size), np.min(image), dtype=np.float16)
    if not len(xyz):
        return out
    kji = world_to_array_index(xyz, geom)
    inside = np.isfinite(kji).all(axis=1) & (np.abs(kji) < 1e6).all(axis=1)  # else: all air
    low = np.rint(np.where(inside[:, None], kji, -1e6)).astype(int) - size // 2
    for n, start in enumerate(low):
        src = tuple(slice(max(a, 0), min(a + s, d)) for a, s, d in zip(start, size, image.shape))
        dst = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, start))
        if all(sl.stop > sl.start for sl in src):
            out[(n, *dst)] = image[src]
    return out


def centre(crops: np.ndarray, margin: int = MARGIN) -> np.ndarray:
    """The middle of crops cut with ``margin``: the network's input size."""
    if margin == 0:
        return crops
    return crops[:, margin:-margin, margin:-margin, margin:-margin]


def combine(seg_score: np.ndarray, prob: np.ndarray, weight: float) -> np.ndarray:
    """The candidate score: ``seg_score ** (1 - weight) * prob ** weight`` (a weighted geometric
    mean); ``weight`` 0 is the segmentation's score alone, 1 the classifier's alone."""
    seg_score = np.clip(np.asarray(seg_score, dtype=np.float64), 1e-12, 1.0)
    prob = np.clip(np.asarray(prob, dtype=np.float64), 1e-12, 1.0)
    return seg_score ** (1.0 - weight) * prob**weight
