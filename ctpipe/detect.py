"""Nodules as points and as masks: candidates from a probability map, masks from annotations.

Both directions go through world (LPS mm) coordinates with :mod:`ctpipe.geometry`, so candidates
and LUNA16 ``annotations.csv`` rows are comparable whatever the grid (spacing, direction, origin).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from ctpipe.geometry import Geometry, array_index_to_world, contains, sphere_mask

CANDIDATE_COLUMNS = ["coordX", "coordY", "coordZ", "diameter_mm", "score", "volume_mm3"]
# 26-connectivity: voxels touching at an edge or a corner belong to the same nodule.
CONNECTIVITY_26 = ndimage.generate_binary_structure(3, 3)


def equivalent_diameter_mm(volume_mm3: np.ndarray) -> np.ndarray:
    """Diameter of the sphere with the given volume: ``(6 V / pi) ** (1/3)``."""
    return np.cbrt(6.0 * np.asarray(volume_mm3, dtype=np.float64) / np.pi)


def segment(prob: np.ndarray, threshold: float, component_threshold: float = 0.0) -> np.ndarray:
    """Nodule mask of a probability map, by hysteresis: voxels ``>= threshold``, in 26-connected
    components whose highest probability reaches ``component_threshold``.

    ``threshold`` sets how far a nodule extends; ``component_threshold`` decides whether a
    component is a nodule at all. A network's boundary voxels are less certain than its centres,
    so a low ``threshold`` recovers the extent that a single cut at 0.5 loses, while the higher
    ``component_threshold`` removes the faint blobs that the low one would add (on vessels,
    mostly). With ``component_threshold <= threshold`` this is plain thresholding.

    Args:
        prob: foreground probability, any shape (2D or 3D; 26-connectivity in 3D).
        threshold: lowest probability of a mask voxel.
        component_threshold: lowest peak probability of a kept component.

    Returns:
        Boolean mask, same shape as ``prob``.
    """
    prob = np.asarray(prob)
    mask = prob >= threshold
    if component_threshold <= threshold or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(prob.ndim, prob.ndim))
    peak = np.asarray(ndimage.maximum(prob, labels, np.arange(1, n + 1)))
    keep = np.concatenate([[False], peak >= component_threshold])
    return keep[labels]


def operating_score(threshold: float, component_threshold: float) -> float:
    """The lesion operating point of :func:`segment`: a candidate (a component of
    ``prob >= threshold``, scored by its peak) counts as a detection where its score reaches this,
    exactly the components the mask keeps."""
    return max(float(threshold), float(component_threshold))


def candidates_from_probability(
    prob: np.ndarray, geom: Geometry, threshold: float, min_volume_mm3: float = 0.0
) -> pd.DataFrame:
    """Nodule candidates: 26-connected components of ``prob >= threshold``.

    Args:
        prob: foreground probability, numpy ``[k, j, i]`` order, on the grid of ``geom``.
        geom: geometry of that grid.
        threshold: lowest probability that belongs to a candidate; > 0, so that every component
            has a probability-weighted centroid.
        min_volume_mm3: components smaller than this are dropped.

    Returns:
        One row per component, sorted by ``score`` (descending): ``coordX, coordY, coordZ`` (world
        mm, probability-weighted centroid), ``diameter_mm`` (equivalent-sphere diameter),
        ``score`` (highest probability in the component), ``volume_mm3`` (voxels * voxel volume).
    """
    prob = np.asarray(prob)
    if prob.ndim != 3:
        raise ValueError(f"prob must be a 3D [k, j, i] array, got shape {prob.shape}")
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    labels, n = ndimage.label(prob >= threshold, structure=CONNECTIVITY_26)
    if n == 0:
        return pd.DataFrame({c: pd.Series(dtype=np.float64) for c in CANDIDATE_COLUMNS})
    index = np.arange(1, n + 1)
    weights = prob.astype(np.float64)
    volume = np.bincount(labels.ravel(), minlength=n + 1)[1:] * geom.voxel_volume_mm3
    centroid_kji = np.asarray(ndimage.center_of_mass(weights, labels, index), dtype=np.float64)
    xyz = array_index_to_world(centroid_kji, geom).reshape(-1, 3)
    out = pd.DataFrame(
        {
            "coordX": xyz[:, 0],
            "coordY": xyz[:, 1],
            "coordZ": xyz[:, 2],
            "diameter_mm": equivalent_diameter_mm(volume),
            "score": np.asarray(ndimage.maximum(weights, labels, index), dtype=np.float64),
            "volume_mm3": volume,
        }
    )
    out = out[out["volume_mm3"] >= min_volume_mm3]
    return out.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def nodule_mask(
    shape_kji: tuple[int, int, int],
    geom: Geometry,
    nodules: pd.DataFrame,
    hu: np.ndarray | None = None,
    hu_threshold: float | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Paint annotated nodules (world-mm centre, diameter) as spheres into a label mask.

    With ``hu`` and ``hu_threshold`` only sphere voxels brighter than the threshold are kept, which
    trims the sphere to the dense nodule tissue ("Deep Learning with PyTorch", part 2).

    Args:
        shape_kji: shape of the volume, numpy ``[k, j, i]`` order.
        geom: geometry of the volume.
        nodules: ``coordX, coordY, coordZ, diameter_mm`` (world mm), one scan's annotations.
        hu: intensities of the volume in HU, shape ``shape_kji``; needs ``hu_threshold``.
        hu_threshold: HU above which a sphere voxel is kept; needs ``hu``.

    Returns:
        The ``uint8`` mask (1 = nodule) and a copy of ``nodules`` with ``inside`` (the centre lies
        in the volume, :func:`ctpipe.geometry.contains`) and ``voxels`` (voxels this nodule
        painted; overlapping nodules each count the shared voxels). A nodule outside the volume
        is reported with ``inside == False``, not dropped; its sphere may still reach in.
    """
    shape_kji = tuple(int(s) for s in shape_kji)
    if (hu is None) != (hu_threshold is None):
        raise ValueError("hu and hu_threshold must be given together")
    if hu is not None and np.shape(hu) != shape_kji:
        raise ValueError(f"hu has shape {np.shape(hu)}, expected {shape_kji}")
    missing = [c for c in ("coordX", "coordY", "coordZ", "diameter_mm") if c not in nodules]
    if missing:
        raise ValueError(f"nodules lacks columns {missing}; has {list(nodules.columns)}")
    bright = None if hu is None else np.asarray(hu) > hu_threshold
    mask = np.zeros(shape_kji, dtype=np.uint8)
    inside, voxels = [], []
    centres = nodules[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
    for centre, diameter in zip(centres, nodules["diameter_mm"].to_numpy(np.float64)):
        sphere = sphere_mask(shape_kji, geom, centre, diameter / 2.0)
        if bright is not None:
            sphere &= bright
        mask[sphere] = 1
        inside.append(contains(shape_kji, geom, centre))
        voxels.append(int(sphere.sum()))
    out = nodules.copy()
    out["inside"] = np.asarray(inside, dtype=bool)
    out["voxels"] = np.asarray(voxels, dtype=np.int64)
    return mask, out
