"""LUNA16 lesion-level evaluation: candidates matched to nodules, FROC, CPM, bootstrap intervals.

Lesion-level evaluation follows the official LUNA16 script (``noduleCADEvaluationLUNA16.py``):

* a candidate hits a nodule when its centre is *strictly* closer than the nodule radius
  (``diameter_mm / 2``; a negative diameter, used for LUNA16's excluded findings, means 10 mm);
* of several hits on one nodule only the highest-scoring one is a true positive; the others are
  ignored, neither TP nor FP;
* the FROC curve counts FPs per scan over all ``n_scans`` scans (scans without candidates or
  nodules included) and sensitivity over all nodules (missed ones included);
* sensitivities at 1/8 ... 8 FPs per scan are read off the curve by linear interpolation (as
  ``np.interp`` does in the official script); the CPM is their mean;
* the 95% interval resamples scans with replacement.

Deliberate difference: a candidate within the radius of several nodules is assigned to the nearest
one only (the official script counts it for each and prints a warning).

``monai.metrics.froc`` is not used for LUNA16: ``compute_froc_curve_data`` loops over every
threshold (quadratic in the number of candidates, too slow for bootstrapping), drops the lowest
threshold, and ``compute_froc_score`` returns only the mean. The tests check that our curve agrees
with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

LUNA16_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


# LUNA16 gives findings without a measured size diameter -1 and matches them with a 10 mm sphere.
UNKNOWN_DIAMETER_MM = 10.0


XYZ = ["coordX", "coordY", "coordZ"]


CANDIDATE_COLUMNS = ["seriesuid", *XYZ, "score"]


NODULE_COLUMNS = ["seriesuid", *XYZ, "diameter_mm"]


def _check_frame(frame: pd.DataFrame, columns: list[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}; has {list(frame.columns)}")
    numeric = frame[[c for c in columns if c != "seriesuid"]].to_numpy(np.float64)
    if np.isnan(numeric).any():
        raise ValueError(f"{name} has NaN in {columns[1:]}")


def match_candidates(candidates: pd.DataFrame, nodules: pd.DataFrame) -> pd.DataFrame:
    """Assign candidates to ground-truth nodules with the LUNA16 hit rule.

    Args:
        candidates: ``seriesuid, coordX, coordY, coordZ, score`` (world mm).
        nodules: ``seriesuid, coordX, coordY, coordZ, diameter_mm`` (world mm).

    Returns:
        A copy of ``candidates`` (same index and order) with ``nodule_index``: the *position*
        (``nodules.iloc``) of the nearest nodule of the same scan whose radius strictly contains
        the candidate, or -1; and ``is_tp``: True only for the highest-scoring hit of each nodule
        (ties: the first in row order). A candidate is a false positive iff ``nodule_index == -1``;
        a hit with ``is_tp == False`` is a double detection and is ignored.
    """
    _check_frame(candidates, CANDIDATE_COLUMNS, "candidates")
    _check_frame(nodules, NODULE_COLUMNS, "nodules")
    cand_xyz = candidates[XYZ].to_numpy(np.float64)
    nod_xyz = nodules[XYZ].to_numpy(np.float64)
    diameter = nodules["diameter_mm"].to_numpy(np.float64)
    radius2 = (np.where(diameter < 0, UNKNOWN_DIAMETER_MM, diameter) / 2.0) ** 2

    nodule_index = np.full(len(candidates), -1, dtype=np.int64)
    nod_groups = pd.Series(np.arange(len(nodules))).groupby(nodules["seriesuid"].to_numpy()).indices
    cand_groups = (
        pd.Series(np.arange(len(candidates))).groupby(candidates["seriesuid"].to_numpy()).indices
    )
    for uid, ci in cand_groups.items():
        ni = nod_groups.get(uid)
        if ni is None:
            continue
        d2 = ((cand_xyz[ci, None, :] - nod_xyz[None, ni, :]) ** 2).sum(axis=-1)
        d2 = np.where(d2 < radius2[ni], d2, np.inf)
        hit = np.isfinite(d2).any(axis=1)
        nodule_index[ci[hit]] = ni[np.argmin(d2[hit], axis=1)]

    # The best-scoring hit of each nodule is its TP: sort hits by score, keep each nodule's first.
    scores = candidates["score"].to_numpy(np.float64)
    hits = np.flatnonzero(nodule_index >= 0)
    hits = hits[np.argsort(-scores[hits], kind="stable")]
    _, first = np.unique(nodule_index[hits], return_index=True)
    is_tp = np.zeros(len(candidates), dtype=bool)
    is_tp[hits[first]] = True

    out = candidates.copy()
    out["nodule_index"] = nodule_index
    out["is_tp"] = is_tp
    return out


@dataclass(frozen=True)
class _Scored:
    """The TPs and FPs of a matched evaluation, sorted by descending score, tagged by scan."""

    scores: np.ndarray  # descending
    is_tp: np.ndarray
    scan: np.ndarray  # scan code of each entry
    group_end: np.ndarray  # True at the last entry of each run of equal scores
    nodules_per_scan: np.ndarray  # indexed by scan code

    @classmethod
    def build(cls, matched: pd.DataFrame, nodules: pd.DataFrame, scans: pd.Index) -> _Scored:
        keep = (matched["nodule_index"].to_numpy() < 0) | matched["is_tp"].to_numpy()
        scores = matched["score"].to_numpy(np.float64)[keep]
        order = np.argsort(-scores, kind="stable")
        scores = scores[order]
        return cls(
            scores=scores,
            is_tp=matched["is_tp"].to_numpy(bool)[keep][order],
            scan=scans.get_indexer(matched["seriesuid"])[keep][order],
            group_end=np.r_[scores[1:] != scores[:-1], True][: len(scores)],
            nodules_per_scan=np.bincount(
                scans.get_indexer(nodules["seriesuid"]), minlength=len(scans)
            ),
        )

    def curve(self, scan_weight: np.ndarray, n_empty: int = 0) -> dict[str, np.ndarray]:
        """FROC curve when scan ``s`` is counted ``scan_weight[s]`` times (1 everywhere: as is).

        ``n_empty`` more scans, with neither candidates nor nodules, only add to the FP divisor.
        Points run from the highest threshold (``inf``: nothing detected) down to the lowest score.
        """
        w = scan_weight[self.scan]
        tp = np.cumsum(np.where(self.is_tp, w, 0))[self.group_end]
        fp = np.cumsum(np.where(self.is_tp, 0, w))[self.group_end]
        n_scans = scan_weight.sum() + n_empty
        n_nodules = (scan_weight * self.nodules_per_scan).sum()
        sens = np.r_[0, tp] / n_nodules if n_nodules > 0 else np.full(len(tp) + 1, np.nan)
        return {
            "thresholds": np.r_[np.inf, self.scores[self.group_end]],
            "fps_per_scan": np.r_[0, fp] / n_scans,
            "sensitivity": sens,
        }


def sensitivity_at_rates(
    fps_per_scan: np.ndarray, sensitivity: np.ndarray, fp_rates: Sequence[float]
) -> np.ndarray:
    """Read sensitivities off a FROC curve at given FP rates by linear interpolation.

    Same values as the official script's ``np.interp(rates, fps, sens)``, written out because the
    curve has repeated FP rates (several TPs between two FPs), which ``np.interp`` does not
    document: at a repeated rate the highest sensitivity counts, between rates the segment joins
    the last point of one rate to the first of the next; past the end the last value holds.
    """
    fps, sens = np.asarray(fps_per_scan, np.float64), np.asarray(sensitivity, np.float64)
    rates = np.asarray(fp_rates, np.float64)
    j = np.searchsorted(fps, rates, side="right") - 1  # last point with fps <= rate
    if np.any(j < 0):
        raise ValueError(f"FP rates {rates.tolist()} start below the curve's first point {fps[0]}")
    nxt = np.minimum(j + 1, len(fps) - 1)
    span = fps[nxt] - fps[j]
    t = np.divide(rates - fps[j], span, out=np.zeros_like(rates), where=span > 0)
    return sens[j] + t * (sens[nxt] - sens[j])


def _summary(curve: dict[str, np.ndarray], fp_rates: Sequence[float]) -> dict:
    at = sensitivity_at_rates(curve["fps_per_scan"], curve["sensitivity"], fp_rates)
    return {
        "sensitivity_at": {float(r): float(s) for r, s in zip(fp_rates, at)},
        "cpm": float(np.mean(at)),
    }


def _scan_index(candidates: pd.DataFrame, nodules: pd.DataFrame, scans: list[str]) -> pd.Index:
    index = pd.Index(scans)
    if not index.is_unique:
        raise ValueError("seriesuids has duplicates")
    for name, frame in (("candidates", candidates), ("nodules", nodules)):
        unknown = sorted(set(frame["seriesuid"]) - set(index))
        if unknown:
            raise ValueError(
                f"{name} has {len(unknown)} scans not in seriesuids, e.g. {unknown[:3]}"
            )
    return index


def froc(
    candidates: pd.DataFrame,
    nodules: pd.DataFrame,
    n_scans: int,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
) -> dict:
    """LUNA16 FROC curve, sensitivities at fixed FP rates and CPM.

    Args:
        candidates: ``seriesuid, coordX, coordY, coordZ, score`` of every evaluated scan.
        nodules: ``seriesuid, coordX, coordY, coordZ, diameter_mm`` of the same scans.
        n_scans: number of evaluated scans, including those with neither candidates nor nodules.
        fp_rates: FP-per-scan operating points averaged into the CPM.

    Returns:
        ``curve`` (``thresholds``, ``fps_per_scan``, ``sensitivity`` arrays, from ``inf`` down to
        the lowest score), ``sensitivity_at`` ({rate: sensitivity}), ``cpm``, and at the lowest
        threshold (all candidates) ``sensitivity`` and ``fp_per_scan``; counts ``n_scans``,
        ``n_nodules``, ``n_tp``, ``n_fp``, ``n_ignored``. Without any nodule every sensitivity
        and the CPM are NaN.
    """
    matched = match_candidates(candidates, nodules)
    scans = pd.Index(pd.unique(pd.concat([matched["seriesuid"], nodules["seriesuid"]])))
    if n_scans < max(len(scans), 1):
        raise ValueError(f"n_scans={n_scans}, but candidates and nodules cover {len(scans)} scans")
    scored = _Scored.build(matched, nodules, scans)
    curve = scored.curve(np.ones(len(scans), dtype=np.int64), n_empty=n_scans - len(scans))
    n_tp = int(matched["is_tp"].sum())
    n_fp = int((matched["nodule_index"] < 0).sum())
    return {
        "curve": curve,
        **_summary(curve, fp_rates),
        "sensitivity": float(curve["sensitivity"][-1]),
        "fp_per_scan": float(curve["fps_per_scan"][-1]),
        "n_scans": int(n_scans),
        "n_nodules": len(nodules),
        "n_tp": n_tp,
        "n_fp": n_fp,
        "n_ignored": len(matched) - n_tp - n_fp,
    }


def operating_point(candidates: pd.DataFrame, nodules: pd.DataFrame, n_scans: int) -> dict:
    """Lesion figures at the operating point: only the ``detected`` candidates (the mask's
    components, :func:`ctpipe.postprocessing.candidates.find_nodules`) are matched, so a nodule counts as found
    exactly when a mask component hits it, whatever the scores of the other candidates.

    Returns ``sensitivity``, ``fp_per_scan`` and ``confusion``: one row per nodule (``actual``
    nodule, ``predicted`` nodule or background) and one per false detection (background, nodule).
    """
    detected = candidates[candidates["detected"].to_numpy(bool)]
    result = froc(detected, nodules, n_scans)
    matched = match_candidates(detected, nodules)
    found = set(int(i) for i in matched.loc[matched["is_tp"], "nodule_index"])
    fps = int((matched["nodule_index"] < 0).sum())
    rows = [
        {"actual": "nodule", "predicted": "nodule" if i in found else "background"}
        for i in range(len(nodules))
    ]
    rows += [{"actual": "background", "predicted": "nodule"}] * fps
    return {
        "sensitivity": result["sensitivity"],
        "fp_per_scan": result["fp_per_scan"],
        "confusion": pd.DataFrame(rows, columns=["actual", "predicted"]),
    }


def _interval(values: np.ndarray, estimate: float, confidence: float) -> dict[str, float]:
    """Percentile interval and mean of bootstrap values, NaN resamples left out."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return {"estimate": estimate, "lo": np.nan, "hi": np.nan, "mean": np.nan}
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return {"estimate": estimate, "lo": float(lo), "hi": float(hi), "mean": float(values.mean())}


def cpm_draws(
    candidates: pd.DataFrame,
    nodules: pd.DataFrame,
    seriesuids: list[str],
    n_bootstrap: int,
    seed: int,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
) -> np.ndarray:
    """The CPM of each of ``n_bootstrap`` resamples of the scans, drawn as :func:`bootstrap_froc`
    draws them (NaN where a resample has no nodule). The same ``seed`` and ``seriesuids`` give
    the same resamples whatever the scores, so two scorings of one set of candidates compare
    resample by resample (a paired bootstrap)."""
    scans = _scan_index(candidates, nodules, seriesuids)
    scored = _Scored.build(match_candidates(candidates, nodules), nodules, scans)
    return np.array(
        [
            sensitivity_at_rates(curve["fps_per_scan"], curve["sensitivity"], fp_rates).mean()
            for curve in _resampled_curves(scored, len(scans), n_bootstrap, seed)
        ],
        dtype=np.float64,
    )


def _resampled_curves(scored: _Scored, n_scans: int, n_bootstrap: int, seed: int):
    """The FROC curve of each bootstrap resample of the ``n_scans`` scans, seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        weight = np.bincount(rng.integers(0, n_scans, n_scans), minlength=n_scans)
        yield scored.curve(weight)


def bootstrap_froc(
    candidates: pd.DataFrame,
    nodules: pd.DataFrame,
    seriesuids: list[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
    confidence: float = 0.95,
) -> dict:
    """Percentile bootstrap intervals of the CPM, of each sensitivity and of the curve's end point
    (sensitivity and FPs per scan with every candidate counted: pass the ``detected`` candidates
    alone for the operating point), resampling scans.

    Matching never crosses scans, so candidates are matched once and a scan drawn ``c`` times is
    counted ``c`` times (its nodules, TPs and FPs alike): the same as re-matching ``c`` renamed
    copies, without the copies. Resamples without any nodule give NaN and are left out of the
    percentiles (counted in ``n_undefined``).

    Args:
        candidates: as for :func:`froc`.
        nodules: as for :func:`froc`.
        seriesuids: every evaluated scan, once each; candidates and nodules must lie within them.
        n_bootstrap: number of resamples.
        seed: seed of ``numpy.random.default_rng``.
        fp_rates: as for :func:`froc`.
        confidence: coverage of the two-sided percentile interval.

    Returns:
        ``cpm``, ``sensitivity_at[rate]``, ``sensitivity`` and ``fp_per_scan`` (at the lowest
        threshold) each as ``{"estimate", "lo", "hi", "mean"}`` (``estimate`` from the full data,
        ``mean`` over resamples), plus ``n_bootstrap``, ``n_undefined``, ``seed``, ``confidence``.
    """
    if n_bootstrap < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_bootstrap >= 1, 0 < confidence < 1: {n_bootstrap}, {confidence}")
    scans = _scan_index(candidates, nodules, seriesuids)
    point = froc(candidates, nodules, len(scans), fp_rates)
    scored = _Scored.build(match_candidates(candidates, nodules), nodules, scans)
    draws = np.empty((n_bootstrap, len(fp_rates)), dtype=np.float64)
    ends = np.empty((n_bootstrap, 2), dtype=np.float64)  # sensitivity, FPs per scan
    for b, curve in enumerate(_resampled_curves(scored, len(scans), n_bootstrap, seed)):
        draws[b] = sensitivity_at_rates(curve["fps_per_scan"], curve["sensitivity"], fp_rates)
        ends[b] = curve["sensitivity"][-1], curve["fps_per_scan"][-1]

    rates = [float(r) for r in fp_rates]
    at = point["sensitivity_at"]
    return {
        "cpm": _interval(draws.mean(axis=1), point["cpm"], confidence),
        "sensitivity_at": {
            r: _interval(draws[:, c], at[r], confidence) for c, r in enumerate(rates)
        },
        "sensitivity": _interval(ends[:, 0], point["sensitivity"], confidence),
        "fp_per_scan": _interval(ends[:, 1], point["fp_per_scan"], confidence),
        "n_bootstrap": int(n_bootstrap),
        "n_undefined": int(np.isnan(draws[:, 0]).sum()),
        "seed": int(seed),
        "confidence": float(confidence),
    }
