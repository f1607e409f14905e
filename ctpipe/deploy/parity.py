"""The parity gate: two predictors compared on real slabs, by max abs logit difference and by the
Dice of their thresholded predictions; and the real slabs themselves (parity, calibration).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctpipe.evaluation.overlap import dice
from ctpipe.model.data import cases_in, crop2d, load_case, load_index
from ctpipe.model.infer import Predictor
from ctpipe.model.views import slabs

log = logging.getLogger(__name__)

# [batch, H, W] of the real validation slabs the export gate compares: two batch sizes, non-square
# slabs, H and W multiples of 16 that differ from the export's example (64 x 64).
PARITY_SHAPES = ((1, 128, 96), (2, 96, 160))


class ParityError(RuntimeError):
    """An exported model disagrees with its reference beyond the stated tolerances."""


def module_predictor(module: Callable[[torch.Tensor], torch.Tensor]) -> Predictor:
    """Wrap an eager or ``torch.export``-loaded module: float32 CPU logits, no autograd."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x).float().cpu()

    return run


def sample_slabs(
    processed: str | Path,
    split: str,
    context: int,
    shapes: Sequence[Sequence[int]],
    seed: int,
    fg_fraction: float = 1.0,
) -> list[np.ndarray]:
    """Batches of real 2.5D slabs ``[B, 2c+1, H, W]`` from one split only, one per shape."""
    return [x for x, _ in sample_patches(processed, split, context, shapes, seed, fg_fraction)]


def sample_patches(
    processed: str | Path,
    split: str,
    context: int,
    shapes: Sequence[Sequence[int]],
    seed: int,
    fg_fraction: float = 1.0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real 2.5D slabs ``[B, 2c+1, H, W]`` (float32) with their centre-slice labels ``[B, H, W]``.

    One batch per ``(B, H, W)`` in ``shapes``, every slab from a seeded case of ``split`` only; a
    fraction ``fg_fraction`` is centred on a nodule voxel (where the case has one), so predictions
    compared on them are not all background. Crops larger than the slice are padded with its
    minimum (air).
    """
    cases = cases_in(load_index(processed), split)
    if not cases:
        raise ValueError(f"{processed}/index.json: no cases in split '{split}'")
    rng = np.random.default_rng(seed)
    # Only each case's nodule voxels are kept between slabs: the memory-mapped volumes are opened
    # again for each slab, so that no case read stays mapped (a label read whole stays resident).
    nodule_voxels: dict[str, np.ndarray] = {}
    batches = []
    for b, h, w in (tuple(int(v) for v in s) for s in shapes):
        batch = np.empty((b, 2 * context + 1, h, w), dtype=np.float32)
        labels = np.zeros((b, h, w), dtype=bool)
        for n in range(b):
            case_id = cases[int(rng.integers(len(cases)))]["case_id"]
            image, label, _ = load_case(processed, case_id)
            if case_id not in nodule_voxels:
                nodule_voxels[case_id] = np.argwhere(np.asarray(label) > 0)
            fg = nodule_voxels[case_id]
            if len(fg) and rng.random() < fg_fraction:
                k, j, i = fg[int(rng.integers(len(fg)))]
            else:
                k, j, i = (int(rng.integers(s)) for s in image.shape)
            j0, i0 = int(j) - h // 2, int(i) - w // 2
            batch[n] = _crop(slabs(image, np.array([k]), context)[0], j0, i0, h, w)
            labels[n] = _crop(np.asarray(label[k : k + 1]) > 0, j0, i0, h, w)[0]
        batches.append((batch, labels))
    return batches


def _crop(slab: np.ndarray, j0: int, i0: int, h: int, w: int) -> np.ndarray:
    """``slab[:, j0:j0+h, i0:i0+w]``, shifted inside the slab where possible, else padded with
    its minimum (air)."""
    _, sh, sw = slab.shape
    j0 = min(max(j0, 0), max(sh - h, 0))
    i0 = min(max(i0, 0), max(sw - w, 0))
    return crop2d(slab, j0, i0, (h, w), slab.min())


def foreground(logits: np.ndarray, threshold: float) -> np.ndarray:
    """Nodule mask from logits ``[B, 2, H, W]``: softmax foreground probability above threshold."""
    prob = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1)[:, 1]
    return prob.numpy() >= threshold


def parity_figures(
    reference: Predictor, candidate: Predictor, batches: Sequence[np.ndarray], threshold: float
) -> dict[str, Any]:
    """Compare two predictors batch by batch: max/mean abs logit difference and mask Dice.

    The Dice is over the masks of all batches together, and per shape.
    """
    per_shape, masks_ref, masks_cand = [], [], []
    for x in batches:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        ref, cand = reference(t).numpy(), candidate(t).numpy()
        if ref.shape != cand.shape:
            raise ParityError(f"output shape {cand.shape} differs from the reference {ref.shape}")
        diff = np.abs(ref.astype(np.float64) - cand)
        m_ref, m_cand = foreground(ref, threshold), foreground(cand, threshold)
        masks_ref.append(m_ref.ravel())
        masks_cand.append(m_cand.ravel())
        per_shape.append(
            {
                "shape": list(x.shape),
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
                "max_abs_logit": float(np.abs(ref).max()),
                "dice": dice(m_ref, m_cand),
                "foreground_voxels": int(m_ref.sum()),
            }
        )
    return {
        "shapes": per_shape,
        "max_abs_diff": max(s["max_abs_diff"] for s in per_shape),
        "dice": dice(np.concatenate(masks_ref), np.concatenate(masks_cand)),
        "dice_min": min(s["dice"] for s in per_shape),
        "foreground_voxels": sum(s["foreground_voxels"] for s in per_shape),
    }


def assert_parity(
    figures: dict[str, Any], atol: float, min_dice: float, what: str
) -> dict[str, Any]:
    """Raise :class:`ParityError` with the figures unless every shape is within both limits.

    Returns the figures with ``atol``, ``min_dice`` and ``passed`` added.
    """
    ok_diff = figures["max_abs_diff"] <= atol
    ok_dice = figures["dice_min"] >= min_dice
    out = {
        **figures,
        "atol": float(atol),
        "min_dice": float(min_dice),
        "passed": bool(ok_diff and ok_dice),
    }
    if not out["passed"]:
        shapes = "; ".join(
            f"{s['shape']}: max|diff| {s['max_abs_diff']:.3g}, Dice {s['dice']:.5f}"
            for s in figures["shapes"]
        )
        raise ParityError(
            f"{what}: parity gate failed (max |logit diff| {figures['max_abs_diff']:.3g} vs tolerance "
            f"{atol:.3g}; lowest Dice {figures['dice_min']:.5f} vs required {min_dice}): {shapes}"
        )
    log.info(
        "%s: parity ok (max |diff| %.3g <= %.3g, Dice %.5f >= %s)",
        what,
        figures["max_abs_diff"],
        atol,
        figures["dice_min"],
        min_dice,
    )
    return out
