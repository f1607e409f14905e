"""Training labels: annotated nodules (world-mm centre and diameter) painted as spheres into a mask.

The painting goes through world (LPS mm) coordinates with :mod:`ctpipe.geometry`, so LUNA16
``annotations.csv`` rows land right whatever the grid (spacing, direction, origin).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ctpipe.geometry import Geometry, contains, sphere_mask


def nodule_mask(
    shape_kji: tuple[int, int, int],
    geom: Geometry,
    nodules: pd.DataFrame,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Paint annotated nodules (world-mm centre, diameter) as spheres into a label mask.

    Args:
        shape_kji: shape of the volume, numpy ``[k, j, i]`` order.
        geom: geometry of the volume.
        nodules: ``coordX, coordY, coordZ, diameter_mm`` (world mm), one scan's annotations.

    Returns:
        The ``uint8`` mask (1 = nodule) and a copy of ``nodules`` with ``inside`` (the centre lies
        in the volume, :func:`ctpipe.geometry.contains`) and ``voxels`` (voxels this nodule
        painted; overlapping nodules each count the shared voxels). A nodule outside the volume
        is reported with ``inside == False``, not dropped; its sphere may still reach in.
    """
    shape_kji = tuple(int(s) for s in shape_kji)
    missing = [c for c in ("coordX", "coordY", "coordZ", "diameter_mm") if c not in nodules]
    if missing:
        raise ValueError(f"nodules lacks columns {missing}; has {list(nodules.columns)}")
    mask = np.zeros(shape_kji, dtype=np.uint8)
    inside, voxels = [], []
    centres = nodules[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
    for centre, diameter in zip(centres, nodules["diameter_mm"].to_numpy(np.float64)):
        sphere = sphere_mask(shape_kji, geom, centre, diameter / 2.0)
        mask[sphere] = 1
        inside.append(contains(shape_kji, geom, centre))
        voxels.append(int(sphere.sum()))
    out = nodules.copy()
    out["inside"] = np.asarray(inside, dtype=bool)
    out["voxels"] = np.asarray(voxels, dtype=np.int64)
    return mask, out
