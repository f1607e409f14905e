"""Post-processing chosen on the validation split after every training, as nnU-Net does.

Three values turn a probability map into findings (:func:`ctpipe.postprocessing.candidates.find_nodules`):
``threshold`` (how far a nodule extends; also the level at which candidates are components),
``component_threshold`` (the peak a component needs to be kept in the mask and counted at the
operating point) and ``shape_weight`` (how much elongation lowers a candidate's FROC score). They
depend on how sharp the trained network's probabilities are, so the ``postprocess`` stage chooses
them for each model from the grids in ``params.yaml`` and writes them to
``models/postprocessing.json``, which evaluate, quantize and export read. A param set to a number
instead of ``auto`` fixes that value (its grid is then that one value).

Rule (``objective: dice``): the pair ``(threshold, component_threshold)`` with the highest mean
validation Dice (cases with nodules, the figure evaluate reports), ties broken by the Dice pooled
over all validation voxels (nodule-free cases count their false positives), then by fewer false
positives per scan, then by the lower values; then, at that threshold, the ``shape_weight`` with
the highest validation CPM, ties to the smallest weight (the least departure from the peak
probability).

With ``objective: dice+cpm`` the three are chosen together: the triple with the highest validation
Dice + CPM (the threshold decides which components are candidates, so it moves the CPM too), ties
broken as above and then by the smaller weight.

Optional large-component rule, ``keep_level`` and ``keep_volume_mm3`` (default ``null``: off):
each component of ``probability >= keep_level`` of at least ``keep_volume_mm3`` is one detection,
taken whole at that level, whatever its peak (:func:`ctpipe.postprocessing.candidates.label_candidates`).
With ``auto`` both are searched together with the pair over their grids (``null`` in the volume
grid: off); among equal figures off wins, then the larger volume, then the higher level: the
least departure from the rule without it.
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
OPTIONAL = ("keep_level", "keep_volume_mm3")  # absent from older postprocessing.json: None (off)
OFF = (None, None)


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


def keep_grid(cfg: dict) -> list[tuple[float | None, float | None]]:
    """The ``(keep_level, keep_volume_mm3)`` pairs searched; ``(None, None)`` is the rule off.

    ``keep_volume_mm3``: ``null``/absent: off only; a number: that volume; ``auto``: its grid
    (``null`` in it: off too). ``keep_level``: a number or ``auto`` (its grid)."""
    value = cfg.get("keep_volume_mm3")
    if value is None:
        return [OFF]
    if value == "auto":
        values = cfg.get("keep_volume_mm3_grid") or []
        if not values:
            raise ValueError("postprocess.keep_volume_mm3_grid is empty")
        off = [OFF] if any(v is None for v in values) else []
        volumes = sorted({_number(v, "keep_volume_mm3_grid") for v in values if v is not None})
    else:
        off, volumes = [], [_number(value, "keep_volume_mm3")]
    levels = grid(cfg.get("keep_level", "auto"), cfg.get("keep_level_grid") or [], "keep_level")
    for name, values, ok, bound in (
        ("keep_volume_mm3", volumes, lambda v: v > 0, "> 0 (mm3)"),
        ("keep_level", levels, lambda v: 0 < v <= 1, "in (0, 1] (a probability)"),
    ):
        bad = [v for v in values if not ok(v)]
        if bad:
            raise ValueError(f"postprocess.{name}: {bad} not {bound}")
    return off + [(level, volume) for level in levels for volume in volumes]


def _number(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"postprocess.{name}: {value!r} is not a number, null or auto") from None


def sweep_masks(
    cases: list[Case],
    nodules: pd.DataFrame,
    thresholds: list[float],
    component_thresholds: list[float],
    min_volume_mm3: float,
    keep: list[tuple[float | None, float | None]] = (OFF,),
) -> pd.DataFrame:
    """One row per pair (and large-component rule, :func:`keep_grid`): case-mean Dice (cases
    with nodules), pooled Dice, operating point.

    The components of each case are labelled once per threshold and rule; every component
    threshold then only selects among them (:func:`ctpipe.postprocessing.candidates.mask_of`).
    """
    rows = []
    for t in thresholds:
        for level, volume in keep:
            labelled = [
                candidates.label_candidates(c.prob, c.geom, t, min_volume_mm3, 0.0, level, volume)
                for c in cases
            ]
            for h in component_thresholds:
                rows.append(_score_masks(cases, nodules, labelled, t, h, level, volume))
    return pd.DataFrame(rows)


def _score_masks(cases, nodules, labelled, t, h, level, volume) -> dict:
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
        "keep_level": float("nan") if level is None else level,
        "keep_volume_mm3": float("nan") if volume is None else volume,
        "dice": float(np.mean(per_case)) if per_case else float("nan"),
        "dice_pooled": overlap.pooled_dice(masks, [c.truth for c in cases]),
        "sensitivity": op["sensitivity"],
        "fp_per_scan": op["fp_per_scan"],
    }


def best_pair(table: pd.DataFrame) -> pd.Series:
    """The row of :func:`sweep_masks` the rule in the module docstring chooses."""
    return _best(table, "dice")


def _best(table: pd.DataFrame, first: str, last: tuple[str, ...] = ()) -> pd.Series:
    """The row with the highest ``first``, ties broken by the module's rule, then by ``last``
    (ascending)."""

    def column(name: str) -> pd.Series:
        values = table[name] if name in table else np.nan
        return -pd.Series(values, index=table.index).fillna(np.inf)  # off first, then larger

    order = table.assign(_volume=column("keep_volume_mm3"), _level=column("keep_level"))
    keys = [first, "dice_pooled", "fp_per_scan", "threshold", "component_threshold"]
    order = order.sort_values(
        [*keys, "_volume", "_level", *last],
        ascending=[False, False, True, True, True, True, True, *[True] * len(last)],
        na_position="last",
        kind="stable",
    )
    return order.iloc[0].drop(["_volume", "_level"])


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


def _rule_of(row: pd.Series) -> tuple[float | None, float | None]:
    """``(keep_level, keep_volume_mm3)`` of a sweep row; None where the rule is off (NaN)."""
    return tuple(
        None if np.isnan(row[k]) else float(row[k]) for k in ("keep_level", "keep_volume_mm3")
    )


def _candidates(cases, t, min_volume, level, volume) -> pd.DataFrame:
    return pd.concat(
        [
            candidates.candidates_from_probability(
                c.prob, c.geom, t, min_volume, 0.0, level, volume
            ).assign(seriesuid=c.seriesuid)
            for c in cases
        ],
        ignore_index=True,
    )


def best_joint(masks, cases, nodules, min_volume, weights) -> tuple[pd.Series, pd.DataFrame]:
    """``objective: dice+cpm``: the row (``masks``' columns plus ``shape_weight`` and ``cpm``) of the
    highest validation Dice + CPM, and the shape table at its threshold and rule."""
    keys = ["threshold", "keep_level", "keep_volume_mm3"]
    shapes, tables = {}, []  # shapes: (threshold, level, volume; None: rule off) -> shape table
    for _, at in masks[keys].drop_duplicates().iterrows():
        t, rule = float(at["threshold"]), _rule_of(at)
        shape = sweep_shape(_candidates(cases, t, min_volume, *rule), nodules, len(cases), weights)
        shapes[(t, *rule)] = shape
        tables.append(shape.assign(**at))
    table = pd.concat(tables, ignore_index=True)
    joined = masks.merge(table[[*keys, "shape_weight", "cpm"]], on=keys, how="left")
    joined = joined.assign(_score=joined["dice"] + joined["cpm"])
    best = _best(joined, "_score", ("shape_weight",)).drop("_score")
    return best, shapes[(float(best["threshold"]), *_rule_of(best))]


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
        keep_grid(cfg),
    )
    weights = grid(cfg["shape_weight"], cfg["shape_weight_grid"], "shape_weight")
    objective = cfg.get("objective", "dice")  # tests may leave it out
    if objective == "dice":
        pair = best_pair(masks)
        level, volume = _rule_of(pair)
        t = float(pair["threshold"])
        shapes = sweep_shape(
            _candidates(cases, t, min_volume, level, volume), nodules, len(cases), weights
        )
        w = best_shape_weight(shapes)
    elif objective == "dice+cpm":
        pair, shapes = best_joint(masks, cases, nodules, min_volume, weights)
        level, volume = _rule_of(pair)
        t, w = float(pair["threshold"]), float(pair["shape_weight"])
    else:
        raise ValueError(f"postprocess.objective must be dice or dice+cpm, got {objective!r}")
    h = float(pair["component_threshold"])
    return {
        "chosen": {
            "threshold": t,
            "component_threshold": h,
            "shape_weight": w,
            "keep_level": level,
            "keep_volume_mm3": volume,
        },
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
        "fixed": [k for k in KEYS if cfg[k] != "auto"]
        + [k for k in OPTIONAL if cfg.get(k) not in ("auto", None)],  # null: off, not a value
        "masks": masks,
        "shape": shapes,
    }


def load(path: str | Path) -> dict[str, float | None]:
    """The chosen ``threshold``, ``component_threshold``, ``shape_weight``, ``keep_level`` and
    ``keep_volume_mm3`` (None: off, also for files written before them) of a
    ``postprocessing.json`` written by the postprocess stage."""
    chosen = read_json(Path(path)).get("chosen", {})
    missing = [k for k in KEYS if k not in chosen]
    if missing:
        raise ValueError(
            f"{path}: 'chosen' lacks {missing}; re-run the postprocess stage (dvc repro postprocess)"
        )
    out: dict[str, float | None] = {k: float(chosen[k]) for k in KEYS}
    for k in OPTIONAL:
        out[k] = None if chosen.get(k) is None else float(chosen[k])
    return out
