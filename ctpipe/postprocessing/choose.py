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

The cases stream: each is reduced to small tables as it arrives (:class:`Tables`: per pair of
thresholds the Dice terms, per threshold the candidates) and its volumes are dropped, so the choice
needs one case's memory however many validation cases there are.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
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


@dataclass
class Tables:
    """All the choice needs of the validation cases, and no volume: a case's probability map and
    truth are reduced to these as it arrives, so memory holds one case's volumes whatever the size
    of the split (LUNA16's 130 validation scans would need about 22 GB as volumes).

    Attributes:
        thresholds, component_thresholds: the grids tabulated.
        min_volume_mm3: components smaller than this are not candidates (nor in the mask).
        truth_voxels: each case's number of truth voxels, in case order.
        overlap: ``(threshold, component_threshold)`` -> each case's ``(intersection, predicted
            voxels)`` of its nodule mask with its truth: the terms of the Dice.
        candidates: ``threshold`` -> each case's candidates (:func:`label_candidates`' table with
            ``seriesuid``): the operating point and the shape sweep read their ``peak``.
    """

    thresholds: list[float]
    component_thresholds: list[float]
    min_volume_mm3: float
    truth_voxels: list[int] = field(default_factory=list)
    overlap: dict[tuple[float, float], list[tuple[int, int]]] = field(default_factory=dict)
    candidates: dict[float, list[pd.DataFrame]] = field(default_factory=dict)

    @property
    def cases(self) -> int:
        return len(self.truth_voxels)

    def add(self, case: Case) -> None:
        """Tabulate one case: label it once per threshold (the components every component
        threshold selects among, :func:`ctpipe.postprocessing.candidates.mask_of`)."""
        truth = np.asarray(case.truth) > 0
        self.truth_voxels.append(int(np.count_nonzero(truth)))
        for t in self.thresholds:
            labels, cands = candidates.label_candidates(
                case.prob, case.geom, t, self.min_volume_mm3
            )
            self.candidates.setdefault(t, []).append(cands.assign(seriesuid=case.seriesuid))
            for h in self.component_thresholds:
                mask = candidates.mask_of(labels, cands, t, h)
                counts = (int(np.count_nonzero(mask & truth)), int(np.count_nonzero(mask)))
                self.overlap.setdefault((t, h), []).append(counts)

    def found(self, t: float) -> pd.DataFrame:
        """Every case's candidates at threshold ``t``, in case order."""
        return pd.concat(self.candidates[t], ignore_index=True)


def tabulate(
    cases: Iterable[Case],
    thresholds: list[float],
    component_thresholds: list[float],
    min_volume_mm3: float,
) -> Tables:
    """The :class:`Tables` of ``cases``, taken one at a time from any iterable (a generator that
    predicts each case as it is asked for keeps one case in memory)."""
    tables = Tables(thresholds, component_thresholds, min_volume_mm3)
    for case in cases:
        tables.add(case)
        del case  # else the loop keeps this case's volumes while the next one is made
    return tables


def _dice(intersection: int, predicted: int, truth: int) -> float:
    pooled = overlap.PooledDice()
    pooled.add_counts(intersection, predicted + truth)
    return pooled.value


def sweep_masks(tables: Tables, nodules: pd.DataFrame) -> pd.DataFrame:
    """One row per pair of the grids: case-mean Dice (cases with nodules), pooled Dice, operating
    point (sensitivity, FP per scan)."""
    rows = []
    for t in tables.thresholds:
        found = tables.found(t)
        for h in tables.component_thresholds:
            rows.append(_score_masks(tables, nodules, found, t, h))
    return pd.DataFrame(rows)


def _score_masks(tables: Tables, nodules, found, t, h) -> dict:
    op = luna16.operating_point(
        found.assign(detected=candidates.at_operating_point(found, t, h)), nodules, tables.cases
    )
    counts = tables.overlap[(t, h)]
    per_case = [_dice(i, p, g) for (i, p), g in zip(counts, tables.truth_voxels) if g > 0]
    intersection, predicted = (sum(column) for column in zip(*counts))
    return {
        "threshold": t,
        "component_threshold": h,
        "dice": float(np.mean(per_case)) if per_case else float("nan"),
        "dice_pooled": _dice(intersection, predicted, sum(tables.truth_voxels)),
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


def best_joint(
    masks: pd.DataFrame, tables: Tables, nodules: pd.DataFrame, weights: list[float]
) -> tuple[pd.Series, pd.DataFrame]:
    """The row (``masks``' columns plus ``shape_weight`` and ``cpm``) of the highest validation
    Dice + CPM, and the shape table at its threshold."""
    shapes, parts = {}, []  # shapes: threshold -> shape table
    for t in masks["threshold"].drop_duplicates():
        cands = tables.found(t).drop(columns="label")
        shape = sweep_shape(cands, nodules, tables.cases, weights)
        shapes[t] = shape
        parts.append(shape.assign(threshold=t))
    table = pd.concat(parts, ignore_index=True)
    joined = masks.merge(table[["threshold", "shape_weight", "cpm"]], on="threshold", how="left")
    joined = joined.assign(_score=joined["dice"] + joined["cpm"])
    row = best(joined, "_score").drop("_score")
    return row, shapes[row["threshold"]]


def choose(
    cases: Iterable[Case], nodules: pd.DataFrame, cfg: config.Postprocess, min_candidate_mm3: float
) -> dict:
    """Choose the post-processing on ``cases`` (the validation split) by the module's rule.

    Args:
        cases: the validation cases with their predictions, any iterable: each is tabulated
            (:func:`tabulate`) and dropped before the next is taken.
        nodules: annotations of those cases (``seriesuid, coordX, coordY, coordZ, diameter_mm``).
        cfg: the ``postprocess`` params (values or ``auto``, and grids).
        min_candidate_mm3: components smaller than this are dropped (``inference`` params).

    Returns:
        ``{"chosen": Chosen, "val": figures at the choice, "fixed": keys set by params,
        "masks": sweep table, "shape": shape table}``.
    """
    tables = tabulate(
        cases,
        grid(cfg.threshold, cfg.threshold_grid),
        grid(cfg.component_threshold, cfg.component_threshold_grid),
        min_candidate_mm3,
    )
    if not tables.cases:
        raise ValueError("no validation cases to choose the post-processing on")
    masks = sweep_masks(tables, nodules)
    weights = grid(cfg.shape_weight, cfg.shape_weight_grid)
    row, shapes = best_joint(masks, tables, nodules, weights)
    chosen = Chosen(row["threshold"], row["component_threshold"], row["shape_weight"])
    return {
        "chosen": chosen,
        "val": {
            "dice": float(row["dice"]),
            "dice_pooled": float(row["dice_pooled"]),
            "sensitivity": float(row["sensitivity"]),
            "fp_per_scan": float(row["fp_per_scan"]),
            "cpm": float(shapes.set_index("shape_weight").loc[chosen.shape_weight, "cpm"]),
            "cases": tables.cases,
            "cases_with_nodules": sum(g > 0 for g in tables.truth_voxels),
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
