"""Voxel metrics per case: Dice, IoU, HD95 and surface Dice (MONAI), and the pooled Dice of masks.

Voxel metrics wrap MONAI (``compute_dice``, ``compute_iou``, ``compute_hausdorff_distance``,
``compute_surface_dice``) on one-hot ``[B, C, k, j, i]`` tensors, with spacing in the same
``[k, j, i]`` order as the arrays. Empty masks follow one documented rule (see
:func:`voxel_metrics`). :func:`dice` and :func:`pooled_dice` are the plain-numpy Dice of binary
masks that the parity and quantization gates compare models with.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)
from monai.networks.utils import one_hot

VOXEL_KEYS = ("dice", "iou", "hd95_mm", "surface_dice")


def _crop_to_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one background voxel.

    Whole CT volumes as float one-hot tensors cost gigabytes; the margin keeps every surface voxel
    (MONAI finds surfaces by erosion), so all four metrics are unchanged.
    """
    nz = np.argwhere(pred | truth)
    lo = np.maximum(nz.min(axis=0) - 1, 0)
    hi = np.minimum(nz.max(axis=0) + 2, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return pred[box], truth[box]


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """Binary ``[k, j, i]`` mask -> one-hot ``[1, 2, k, j, i]`` float tensor (background, fg)."""
    return one_hot(torch.from_numpy(mask.astype(np.float32))[None, None], num_classes=2, dim=1)


def voxel_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing_kji: Sequence[float],
    surface_tolerance_mm: float = 1.0,
) -> dict[str, float]:
    """Dice, IoU, 95th-percentile Hausdorff distance and surface Dice of one case.

    Empty masks: the overlap scores (``dice``, ``iou``, ``surface_dice``) are 1.0 when both masks
    are empty (nothing to find, nothing found) and 0.0 when exactly one is; ``hd95_mm`` is NaN
    when either mask is empty (no surface to measure from), so ``aggregate`` leaves such cases out
    of its mean and reports how many contributed.

    Args:
        pred: binary prediction, numpy ``[k, j, i]`` order.
        truth: binary ground truth, same shape.
        spacing_kji: voxel size in mm in the same ``[k, j, i]`` order (``geom.spacing[::-1]``).
        surface_tolerance_mm: distance within which surface voxels count as agreeing.

    Returns:
        ``{"dice", "iou", "hd95_mm", "surface_dice"}`` as floats.
    """
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must be the same 3D shape")
    spacing = [float(s) for s in spacing_kji]
    if len(spacing) != 3:
        raise ValueError(f"spacing_kji must have 3 values, got {spacing}")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not (has_pred and has_truth):
        score = 1.0 if has_pred == has_truth else 0.0
        return {"dice": score, "iou": score, "hd95_mm": float("nan"), "surface_dice": score}

    p, t = (_one_hot(m) for m in _crop_to_union(pred, truth))
    with warnings.catch_warnings():
        # MONAI 1.6 calls its own deprecated get_mask_edges argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        hd95 = compute_hausdorff_distance(
            p, t, include_background=False, percentile=95, spacing=spacing
        )
        nsd = compute_surface_dice(
            p,
            t,
            class_thresholds=[surface_tolerance_mm],
            include_background=False,
            spacing=spacing,
        )
    return {
        "dice": float(compute_dice(p, t, include_background=False).item()),
        "iou": float(compute_iou(p, t, include_background=False).item()),
        "hd95_mm": float(hd95.item()),
        "surface_dice": float(nsd.item()),
    }


def aggregate(per_case: list[dict]) -> dict:
    """NaN-skipping mean of each metric over cases.

    Args:
        per_case: dicts as returned by :func:`voxel_metrics` (extra numeric keys are averaged too).

    Returns:
        ``{key: mean, f"{key}_n": number of cases with a non-NaN value, "n_cases": len(per_case)}``
        (NaN mean for a key no case has a value for).
    """
    out: dict = {"n_cases": len(per_case)}
    keys = list(dict.fromkeys(k for case in per_case for k in case))
    for key in keys:
        values = np.array([case.get(key, np.nan) for case in per_case], dtype=np.float64)
        finite = ~np.isnan(values)
        out[key] = float(values[finite].mean()) if finite.any() else float("nan")
        out[f"{key}_n"] = int(finite.sum())
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (they agree perfectly)."""
    return pooled_dice([a], [b])


class PooledDice:
    """Dice pooled over masks added one at a time: the streaming form of :func:`pooled_dice`."""

    def __init__(self) -> None:
        self.intersection = self.total = 0

    def add(self, mask: np.ndarray, truth: np.ndarray) -> None:
        m, g = np.asarray(mask) > 0, np.asarray(truth) > 0
        self.add_counts(int(np.logical_and(m, g).sum()), int(m.sum()) + int(g.sum()))

    def add_counts(self, intersection: int, total: int) -> None:
        """Add a pair of masks by their counts: voxels in both, and voxels of each summed (a
        caller that streams volumes keeps these instead of the masks)."""
        self.intersection += intersection
        self.total += total

    @property
    def value(self) -> float:
        return 1.0 if self.total == 0 else 2.0 * self.intersection / self.total


def pooled_dice(masks: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """Dice pooled over all voxels of all volumes (cases without nodules count their FPs).

    Pooling keeps nodule-free cases meaningful, where a per-case Dice is undefined. With another
    prediction's masks as ``labels`` it is the agreement of two models (INT8 against fp32).
    """
    pooled = PooledDice()
    for m, g in zip(masks, labels):
        pooled.add(m, g)
    return pooled.value
