"""Slab orientations of multi-view 2.5D (NumPy only: shared by training, inference and predict).

A volume is stored ``[K, H, W]`` (slices, rows, columns). A view names the axis the 2.5D slabs are
stacked along: ``axial`` (slices ``k``), ``coronal`` (rows ``j``) or ``sagittal`` (columns ``i``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Axis order that brings a view's slicing axis first: volume.transpose(VIEWS[view]) is [slices, rows, cols].
VIEWS = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}


def check_views(views) -> tuple[str, ...]:
    """The views as a tuple, each one of :data:`VIEWS`, none twice; a clear error otherwise."""
    views = tuple(views)
    unknown = [v for v in views if v not in VIEWS]
    if not views or unknown or len(set(views)) != len(views):
        raise ValueError(f"views must be distinct names out of {list(VIEWS)}, got {list(views)}")
    return views


def in_view(volume: np.ndarray, view: str) -> np.ndarray:
    """``volume`` [K, H, W] seen along ``view``: [slices, rows, cols] (a transposed view, no copy)."""
    return volume.transpose(VIEWS[view])


def from_view(array: np.ndarray, view: str) -> np.ndarray:
    """Inverse of :func:`in_view`: back to [K, H, W]."""
    return array.transpose(np.argsort(VIEWS[view]))


def slabs(volume: np.ndarray, indices: np.ndarray, context: int) -> np.ndarray:
    """Stack slices ``k - context .. k + context`` for each k in ``indices``: ``[n, 2c+1, H, W]``."""
    offsets = np.arange(-context, context + 1)
    ks = np.clip(np.asarray(indices)[:, None] + offsets[None, :], 0, volume.shape[0] - 1)
    return np.asarray(volume[ks], dtype=np.float32)


def whole_slab_roi(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """The window that covers a whole ``height x width`` slab in one network pass: each side
    rounded up to ``multiple`` (the network's total down-sampling; the slab is padded into it).

    The network is fully convolutional, so one pass over the slab is the sliding-window result
    without seams, for a fraction of the arithmetic: windows of 128 at overlap 0.5 cover a
    200 x 140 slab with 3 x 2 windows of 128 x 128 (3.5 times its area), one pass computes
    208 x 144 (1.07 times).
    """
    return (-(-int(height) // multiple) * multiple, -(-int(width) // multiple) * multiple)


def slab_by_slab(
    seen: np.ndarray, context: int, batch_slices: int, mirror_axes, window_prob
) -> np.ndarray:
    """Probability ``[n, H, W]`` of a volume seen along a view ``[n, H, W]``: the 2.5D slab of every
    slice, ``batch_slices`` at a time, through ``window_prob`` (slabs [b, 2c+1, H, W] -> [b, H, W])
    with the mirrored passes of ``mirror_axes`` (:func:`mean_over_mirrors`). Edge slices are
    replicated (:func:`slabs`)."""
    prob = np.empty(seen.shape, dtype=np.float32)
    for start in range(0, seen.shape[0], batch_slices):
        ks = np.arange(start, min(start + batch_slices, seen.shape[0]))
        prob[ks] = mean_over_mirrors(slabs(seen, ks, context), mirror_axes, window_prob)
    return prob


def mean_over_views(volume: np.ndarray, views, predict, box=None) -> np.ndarray:
    """Mean over ``views`` of ``predict(volume seen along the view)``, each mapped back to [K, H, W].

    ``predict`` maps a [slices, rows, cols] array to a float32 probability of the same shape.
    ``box`` (a tuple of three slices, :func:`lung_box`): only that part of the volume is predicted,
    the probability is 0 outside it.
    """
    views = check_views(views)
    if box is not None:
        out = np.zeros(volume.shape, dtype=np.float32)
        out[box] = mean_over_views(np.ascontiguousarray(volume[box]), views, predict)
        return out
    total = np.zeros(volume.shape, dtype=np.float32)
    for view in views:
        total += from_view(predict(in_view(volume, view)), view)
    return total / len(views)


def intensity_level(hu: float, normalization: dict) -> float:
    """The normalised intensity of ``hu`` (the preprocessing plan's ``normalization``: clip, then
    z-score)."""
    lo, hi = normalization["clip"]
    return (float(np.clip(hu, lo, hi)) - float(normalization["mean"])) / max(
        float(normalization["std"]), 1e-6
    )


def lung_mask(volume: np.ndarray, level: float) -> np.ndarray:
    """The lungs of a chest CT ``[K, H, W]``: voxels at or below ``level`` (the body threshold,
    -500 HU by default, in the volume's intensities) inside the body, the body being each slice's
    voxels above it with their holes filled. Air outside the patient is not in a hole, so it is
    left out; the airways are in."""
    bright = volume > level
    body = np.stack([ndimage.binary_fill_holes(s) for s in bright])
    return ~bright & body


def lung_box(volume: np.ndarray, level: float, margin) -> tuple[slice, slice, slice] | None:
    """Bounding box of the lungs (:func:`lung_mask`; pieces under 1 % of the largest one are
    left out) grown by ``margin`` voxels along k, j, i and clipped to the volume; None when no
    lung is found, so that the caller predicts the whole volume. Nodules lie in the lungs, so
    inference inside this box finds what it would find in the whole volume, for less work."""
    lungs = lung_mask(volume, level)
    labels, n = ndimage.label(lungs)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    keep = set((np.flatnonzero(sizes >= 0.01 * sizes.max()) + 1).tolist())
    boxes = [b for i, b in enumerate(ndimage.find_objects(labels), 1) if i in keep]
    lo = np.min([[s.start for s in b] for b in boxes], axis=0) - np.asarray(margin, int)
    hi = np.max([[s.stop for s in b] for b in boxes], axis=0) + np.asarray(margin, int)
    lo, hi = np.maximum(lo, 0), np.minimum(hi, volume.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def as_number(value) -> float:
    """A param ``value`` as a float; NaN where it is not a number (text, a list, None, a bool), so
    that a range check refuses it with the param's name instead of a bare TypeError."""
    if isinstance(value, bool):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def lung_roi(volume: np.ndarray, plan: dict, spacing_kji, margin_mm) -> tuple | None:
    """:func:`lung_box` of a normalised volume, with the level and the normalisation of the
    preprocessing ``plan`` (``body_threshold_hu``, ``normalization``) and ``margin_mm`` turned into
    voxels of ``spacing_kji``; None (the whole volume) when ``margin_mm`` is None."""
    if margin_mm is None:
        return None
    mm = as_number(margin_mm)
    if not mm >= 0:  # NaN too
        raise ValueError(
            f"inference.lung_margin_mm must be a margin in mm >= 0, or null for the whole volume; "
            f"got {margin_mm!r}"
        )
    level = intensity_level(plan["body_threshold_hu"], plan["normalization"])
    margin = np.ceil(mm / np.asarray(spacing_kji, dtype=np.float64)).astype(int)
    return lung_box(volume, level, margin)


def mirror_combinations(axes) -> list[tuple[int, ...]]:
    """Every subset of the in-plane mirror axes of a slab (0 = rows, 1 = columns), the empty one
    first: ``[]`` gives one pass, ``[0, 1]`` four (nnU-Net's test-time mirroring, in 2D)."""
    axes = tuple(int(a) for a in axes)
    if any(a not in (0, 1) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(
            f"mirror_axes must be distinct values out of [0, 1] (slab rows, columns), got {list(axes)}"
        )
    return [
        tuple(a for bit, a in enumerate(axes) if mask >> bit & 1) for mask in range(2 ** len(axes))
    ]


def mean_over_mirrors(slabs: np.ndarray, axes, predict) -> np.ndarray:
    """Test-time mirroring: the mean of ``predict`` over mirrored copies of ``slabs`` [n, C, H, W],
    each prediction mirrored back.

    ``predict`` maps [n, C, H, W] slabs to a float32 probability [n, H, W]. A lesion is the same
    lesion mirrored; the network's errors are not, so the mean over the copies is steadier than one
    pass (at the cost of one pass per copy).
    """
    total = None
    combinations = mirror_combinations(axes)
    for flip in combinations:
        seen = np.flip(slabs, [2 + a for a in flip]) if flip else slabs
        prob = predict(np.ascontiguousarray(seen))
        prob = np.flip(prob, [1 + a for a in flip]) if flip else prob
        total = prob.astype(np.float32, copy=True) if total is None else total + prob
    return total / len(combinations)
