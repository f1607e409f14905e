"""Post-processing chosen on the validation split after every training, as nnU-Net does.

Three values turn a probability map into findings (:func:`ctpipe.postprocessing.candidates.find_nodules`):
``threshold`` (how far a nodule extends; also the level at which candidates are components),
``component_threshold`` (the peak a component needs to be kept in the mask and counted at the
operating point) and ``shape_weight`` (how much elongation lowers a candidate's FROC score). They
depend on how sharp the trained network's probabilities are, so the ``postprocess`` stage chooses
them for each model from the grids in ``params.yaml`` and writes them to
``models/postprocessing.json``, which evaluate, quantize and export read. A param set to a number
instead of ``auto`` fixes that value (its grid is then that one value).

Rule: the pair ``(threshold, component_threshold)`` with the highest mean validation Dice (cases
with nodules, the figure evaluate reports), ties broken by the Dice pooled over all validation
voxels (nodule-free cases count their false positives), then by fewer false positives per scan,
then by the lower values; then, at that threshold, the ``shape_weight`` with the highest validation
CPM, ties to the smallest weight (the least departure from the peak probability).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctpipe.evaluation import luna16, overlap
from ctpipe.fileio import read_json
from ctpipe.geometry import Geometry
from ctpipe.postprocessing import candidates

KEYS = ("threshold", "component_threshold", "shape_weight")


@dataclass
class Case:
    """One validation case: its predicted probability, truth mask, geometry and series."""

    prob: np.ndarray
    truth: np.ndarray
    geom: Geometry
    seriesuid: str


def grid(value, values: list, name: str) -> list[float]:
    """The values searched for the param ``name``: ``values`` (its grid, sorted) when ``value`` is
    ``auto``, else the one fixed ``value``."""
    if value == "auto":
        values = sorted({float(v) for v in values})
        if not values:
            raise ValueError(f"postprocess.{name}_grid is empty")
        return values
    return [float(value)]


def sweep_masks(
    cases: list[Case],
    nodules: pd.DataFrame,
    thresholds: list[float],
    component_thresholds: list[float],
    min_volume_mm3: float,
) -> pd.DataFrame:
    """One row per pair: case-mean Dice (cases with nodules), pooled Dice, operating point.

    The components of each case are labelled once per threshold; every component threshold
    then only selects among them (:func:`ctpipe.postprocessing.candidates.mask_of`).
    """
    rows = []
    for t in thresholds:
        labelled = [candidates.label_candidates(c.prob, c.geom, t, min_volume_mm3) for c in cases]
        for h in component_thresholds:
            masks = [candidates.mask_of(labels, cands, t, h) for labels, cands in labelled]
            found = pd.concat(
                [
                    cands.assign(
                        seriesuid=c.seriesuid, detected=candidates.at_operating_point(cands, t, h)
                    )
                    for c, (_, cands) in zip(cases, labelled)
                ],
                ignore_index=True,
            )
            op = luna16.operating_point(found, nodules, len(cases))
            per_case = [
                overlap.pooled_dice([m], [c.truth]) for m, c in zip(masks, cases) if c.truth.any()
            ]
            rows.append(
                {
                    "threshold": t,
                    "component_threshold": h,
                    "dice": float(np.mean(per_case)) if per_case else float("nan"),
                    "dice_pooled": overlap.pooled_dice(masks, [c.truth for c in cases]),
                    "sensitivity": op["sensitivity"],
                    "fp_per_scan": op["fp_per_scan"],
                }
            )
    return pd.DataFrame(rows)


def best_pair(table: pd.DataFrame) -> pd.Series:
    """The row of :func:`sweep_masks` the rule in the module docstring chooses."""
    order = table.sort_values(
        ["dice", "dice_pooled", "fp_per_scan", "threshold", "component_threshold"],
        ascending=[False, False, True, True, True],
        na_position="last",
        kind="stable",
    )
    return order.iloc[0]


def sweep_shape(
    cands: pd.DataFrame, nodules: pd.DataFrame, n_scans: int, weights: list[float]
) -> pd.DataFrame:
    """One row per shape weight: CPM and sensitivities of the FROC the weighted score ranks."""
    rows = []
    for w in weights:
        froc = luna16.froc(
            cands.assign(score=candidates.shape_score(cands["peak"], cands["elongation"], w)),
            nodules,
            n_scans,
        )
        rows.append(
            {
                "shape_weight": w,
                "cpm": froc["cpm"],
                **{f"sens@{rate:g}": value for rate, value in froc["sensitivity_at"].items()},
            }
        )
    return pd.DataFrame(rows)


def best_shape_weight(table: pd.DataFrame) -> float:
    """The weight of the highest CPM; among equal CPMs, the smallest weight."""
    order = table.sort_values(
        ["cpm", "shape_weight"], ascending=[False, True], na_position="last", kind="stable"
    )
    return float(order.iloc[0]["shape_weight"])


def choose(cases: list[Case], nodules: pd.DataFrame, cfg: dict) -> dict:
    """Choose the post-processing on ``cases`` (the validation split) by the module's rule.

    Args:
        cases: the validation cases with their predictions.
        nodules: annotations of those cases (``seriesuid, coordX, coordY, coordZ, diameter_mm``).
        cfg: the ``postprocess`` params (values or ``auto``, and grids) plus ``min_candidate_mm3``.

    Returns:
        ``{"chosen": {threshold, component_threshold, shape_weight}, "val": figures at the choice,
        "fixed": keys set by params, "masks": sweep table, "shape": shape table}``.
    """
    if not cases:
        raise ValueError("no validation cases to choose the post-processing on")
    min_volume = float(cfg["min_candidate_mm3"])
    masks = sweep_masks(
        cases,
        nodules,
        grid(cfg["threshold"], cfg["threshold_grid"], "threshold"),
        grid(cfg["component_threshold"], cfg["component_threshold_grid"], "component_threshold"),
        min_volume,
    )
    pair = best_pair(masks)
    t, h = float(pair["threshold"]), float(pair["component_threshold"])
    cands = pd.concat(
        [
            candidates.candidates_from_probability(c.prob, c.geom, t, min_volume).assign(
                seriesuid=c.seriesuid
            )
            for c in cases
        ],
        ignore_index=True,
    )
    shapes = sweep_shape(
        cands,
        nodules,
        len(cases),
        grid(cfg["shape_weight"], cfg["shape_weight_grid"], "shape_weight"),
    )
    w = best_shape_weight(shapes)
    return {
        "chosen": {"threshold": t, "component_threshold": h, "shape_weight": w},
        "val": {
            "dice": float(pair["dice"]),
            "dice_pooled": float(pair["dice_pooled"]),
            "sensitivity": float(pair["sensitivity"]),
            "fp_per_scan": float(pair["fp_per_scan"]),
            "cpm": float(shapes.set_index("shape_weight").loc[w, "cpm"]),
            "cases": len(cases),
            "cases_with_nodules": int(sum(c.truth.any() for c in cases)),
            "nodules": int(len(nodules)),
        },
        "fixed": [k for k in KEYS if cfg[k] != "auto"],
        "masks": masks,
        "shape": shapes,
    }


def load(path: str | Path) -> dict[str, float]:
    """The chosen ``threshold``, ``component_threshold`` and ``shape_weight`` of a
    ``postprocessing.json`` written by the postprocess stage."""
    chosen = read_json(Path(path)).get("chosen", {})
    missing = [k for k in KEYS if k not in chosen]
    if missing:
        raise ValueError(
            f"{path}: 'chosen' lacks {missing}; re-run the postprocess stage (dvc repro postprocess)"
        )
    return {k: float(chosen[k]) for k in KEYS}
