"""Post-processing chosen on the validation split after every training, as nnU-Net does.

Three values turn a probability map into findings (:class:`~ctpipe.postprocessing.candidates.Chosen`):
``threshold`` (how far a nodule extends; also the level at which candidates are components),
``component_threshold`` (the peak a component needs to be kept in the mask and counted at the
operating point) and ``shape_weight`` (how much elongation lowers a candidate's FROC score). They
depend on how sharp the trained network's probabilities are, so the ``postprocess`` stage chooses
them for each model from the grids in ``params.yaml`` and writes them to
``models/postprocessing.json``, which evaluate, quantize and export read (:func:`load`). A param set
to a number instead of ``auto`` fixes that value (its grid is then that one value).

Rule: the three are chosen together, the triple with the highest validation Dice (mean over the
cases with nodules, the figure evaluate reports) + CPM (the threshold decides which components are
candidates, so it moves the CPM too); ties broken by the Dice pooled over all validation voxels
(nodule-free cases count their false positives), then by fewer false positives per scan, then by
the lower thresholds, then by the smaller weight (the least departure from the peak probability).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ctpipe import config
from ctpipe.evaluation import luna16, overlap
from ctpipe.fileio import read_json
from ctpipe.geometry import Geometry
from ctpipe.postprocessing import candidates
from ctpipe.postprocessing.candidates import Chosen

KEYS = ("threshold", "component_threshold", "shape_weight")


@dataclass
class Case:
    """One validation case: its predicted probability, truth mask, geometry and series."""

    prob: np.ndarray
    truth: np.ndarray
    geom: Geometry
    seriesuid: str


def grid(value: float | str, values: list[float]) -> list[float]:
    """The values searched for a param: ``values`` (its grid, sorted, each once) when ``value`` is
    ``auto``, else the one fixed ``value`` (ranges are checked by :mod:`ctpipe.config`)."""
    return sorted(set(values)) if value == "auto" else [value]


def sweep_masks(
    cases: list[Case],
    nodules: pd.DataFrame,
    thresholds: list[float],
    component_thresholds: list[float],
    min_volume_mm3: float,
) -> pd.DataFrame:
    """One row per pair: case-mean Dice (cases with nodules), pooled Dice, operating point.

    The components of each case are labelled once per threshold; every component threshold then
    only selects among them (:func:`ctpipe.postprocessing.candidates.mask_of`).
    """
    rows = []
    for t in thresholds:
        labelled = [candidates.label_candidates(c.prob, c.geom, t, min_volume_mm3) for c in cases]
        for h in component_thresholds:
            rows.append(_score_masks(cases, nodules, labelled, t, h))
    return pd.DataFrame(rows)


def _score_masks(cases, nodules, labelled, t, h) -> dict:
    masks = [candidates.mask_of(labels, cands, t, h) for labels, cands in labelled]
    found = pd.concat(
        [
            cands.assign(seriesuid=c.seriesuid, detected=candidates.at_operating_point(cands, t, h))
            for c, (_, cands) in zip(cases, labelled)
        ],
        ignore_index=True,
    )
    op = luna16.operating_point(found, nodules, len(cases))
    per_case = [overlap.pooled_dice([m], [c.truth]) for m, c in zip(masks, cases) if c.truth.any()]
    return {
        "threshold": t,
        "component_threshold": h,
        "dice": float(np.mean(per_case)) if per_case else float("nan"),
        "dice_pooled": overlap.pooled_dice(masks, [c.truth for c in cases]),
        "sensitivity": op["sensitivity"],
        "fp_per_scan": op["fp_per_scan"],
    }


def best(table: pd.DataFrame, score: str) -> pd.Series:
    """The row with the highest ``score``, ties broken by the module's rule: higher pooled Dice,
    fewer FP per scan, lower ``threshold``, lower ``component_threshold``, then smaller
    ``shape_weight`` where the table has one."""
    keys = [score, "dice_pooled", "fp_per_scan", "threshold", "component_threshold"]
    keys += ["shape_weight"] if "shape_weight" in table else []
    order = table.sort_values(
        keys,
        ascending=[False, False, *[True] * (len(keys) - 2)],
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


def _candidates(cases: list[Case], t: float, min_volume: float) -> pd.DataFrame:
    return pd.concat(
        [
            candidates.candidates_from_probability(c.prob, c.geom, t, min_volume).assign(
                seriesuid=c.seriesuid
            )
            for c in cases
        ],
        ignore_index=True,
    )


def best_joint(masks, cases, nodules, min_volume, weights) -> tuple[pd.Series, pd.DataFrame]:
    """The row (``masks``' columns plus ``shape_weight`` and ``cpm``) of the highest validation
    Dice + CPM, and the shape table at its threshold."""
    shapes, tables = {}, []  # shapes: threshold -> shape table
    for t in masks["threshold"].drop_duplicates():
        shape = sweep_shape(_candidates(cases, t, min_volume), nodules, len(cases), weights)
        shapes[t] = shape
        tables.append(shape.assign(threshold=t))
    table = pd.concat(tables, ignore_index=True)
    joined = masks.merge(table[["threshold", "shape_weight", "cpm"]], on="threshold", how="left")
    joined = joined.assign(_score=joined["dice"] + joined["cpm"])
    row = best(joined, "_score").drop("_score")
    return row, shapes[row["threshold"]]


def choose(
    cases: list[Case], nodules: pd.DataFrame, cfg: config.Postprocess, min_candidate_mm3: float
) -> dict:
    """Choose the post-processing on ``cases`` (the validation split) by the module's rule.

    Args:
        cases: the validation cases with their predictions.
        nodules: annotations of those cases (``seriesuid, coordX, coordY, coordZ, diameter_mm``).
        cfg: the ``postprocess`` params (values or ``auto``, and grids).
        min_candidate_mm3: components smaller than this are dropped (``inference`` params).

    Returns:
        ``{"chosen": Chosen, "val": figures at the choice, "fixed": keys set by params,
        "masks": sweep table, "shape": shape table}``.
    """
    if not cases:
        raise ValueError("no validation cases to choose the post-processing on")
    masks = sweep_masks(
        cases,
        nodules,
        grid(cfg.threshold, cfg.threshold_grid),
        grid(cfg.component_threshold, cfg.component_threshold_grid),
        min_candidate_mm3,
    )
    weights = grid(cfg.shape_weight, cfg.shape_weight_grid)
    row, shapes = best_joint(masks, cases, nodules, min_candidate_mm3, weights)
    chosen = Chosen(row["threshold"], row["component_threshold"], row["shape_weight"])
    return {
        "chosen": chosen,
        "val": {
            "dice": float(row["dice"]),
            "dice_pooled": float(row["dice_pooled"]),
            "sensitivity": float(row["sensitivity"]),
            "fp_per_scan": float(row["fp_per_scan"]),
            "cpm": float(shapes.set_index("shape_weight").loc[chosen.shape_weight, "cpm"]),
            "cases": len(cases),
            "cases_with_nodules": int(sum(c.truth.any() for c in cases)),
            "nodules": int(len(nodules)),
        },
        "fixed": [k for k in KEYS if getattr(cfg, k) != "auto"],
        "masks": masks,
        "shape": shapes,
    }


def load(path: str | Path) -> Chosen:
    """The post-processing chosen by the postprocess stage, from its ``postprocessing.json``."""
    path = Path(path)
    try:
        return Chosen.from_mapping(read_json(path).get("chosen", {}), f"{path}: 'chosen'")
    except ValueError as exc:
        raise ValueError(f"{exc}; re-run the postprocess stage (dvc repro postprocess)") from None
