"""Slab orientations of multi-view 2.5D (NumPy only: shared by training, inference and predict).

A volume is stored ``[K, H, W]`` (slices, rows, columns). A view names the axis the 2.5D slabs are
stacked along: ``axial`` (slices ``k``), ``coronal`` (rows ``j``) or ``sagittal`` (columns ``i``).
"""

from __future__ import annotations

import numpy as np

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


def mean_over_views(volume: np.ndarray, views, predict) -> np.ndarray:
    """Mean over ``views`` of ``predict(volume seen along the view)``, each mapped back to [K, H, W].

    ``predict`` maps a [slices, rows, cols] array to a float32 probability of the same shape.
    """
    views = check_views(views)
    total = np.zeros(volume.shape, dtype=np.float32)
    for view in views:
        total += from_view(predict(in_view(volume, view)), view)
    return total / len(views)
