"""Figures per subgroup, with bootstrap intervals, and a flag where a group does worse.

Case-level groups (``sex``, ``age_band``, ``scanner``, ``slice_thickness``, from the test cases'
``index.json`` entries) are scored on their own scans: sensitivity and FPs per scan at the
operating point (the ``detected`` candidates), and the CPM over all candidates.

Nodule-level groups (``size``, the Lung-RADS bands, and ``type``, ``texture``, ``margin`` where
``nodules.csv`` has them) are scored on every test scan with only the group's nodules. A candidate
that hits a nodule of another group is ignored, neither true nor false positive (as LUNA16 ignores
hits on its excluded findings), so the false positives are the split's: FPs per scan is not
repeated per group, and the CPM is the group's sensitivity against the split's FPs.

Intervals come from :func:`ctpipe.evaluation.luna16.bootstrap_froc` (scans resampled, the split's
seed and resample count). A group is flagged when an interval lies wholly on the worse side of the
overall estimate: its sensitivity or CPM interval below, its FPs per scan interval above. A value
that is unknown (a header without sex, a CSV without ``type``) is the group ``unknown``; an
attribute unknown for every case or nodule is left out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ctpipe.evaluation import luna16

SIZE_BANDS_MM = (6.0, 8.0, 15.0)  # Lung-RADS v2022 solid-nodule thresholds: [lo, hi) bands
SIZE_LABELS = ("<6 mm", "6-8 mm", "8-15 mm", ">=15 mm")
NODULE_COLUMNS = ("type", "texture", "margin")  # optional columns of nodules.csv
UNKNOWN = "unknown"
METRICS = ("sensitivity", "fp_per_scan", "cpm")
COLUMNS = [
    "subgroup",
    "attribute",
    "group",
    "level",
    "cases",
    "nodules",
    *(f"{m}{end}" for m in METRICS for end in ("", "_lo", "_hi")),
    "flagged",
    "flagged_metrics",
]


def size_band(diameter_mm: float) -> str:
    """The Lung-RADS size band of a diameter; ``unknown`` for LUNA16's -1 (no measured size)."""
    if not diameter_mm >= 0:
        return UNKNOWN
    return SIZE_LABELS[int(np.searchsorted(SIZE_BANDS_MM, diameter_mm, side="right"))]


def case_groups(cases: list[dict]) -> dict[str, list[str]]:
    """Attribute -> the group of each case (``index.json`` entries, in order)."""

    def thickness(case: dict) -> str:
        value = case.get("slice_thickness_mm")
        return f"{value:g} mm" if value else UNKNOWN

    groups = {
        name: [str(case.get(name) or UNKNOWN) for case in cases]
        for name in ("sex", "age_band", "scanner")
    }
    groups["slice_thickness"] = [thickness(case) for case in cases]
    return {name: labels for name, labels in groups.items() if set(labels) != {UNKNOWN}}


def nodule_groups(nodules: pd.DataFrame) -> dict[str, list[str]]:
    """Attribute -> the group of each nodule (rows of ``nodules``, in order)."""
    groups = {"size": [size_band(d) for d in nodules["diameter_mm"].to_numpy(float)]}
    for name in NODULE_COLUMNS:
        if name in nodules.columns:
            groups[name] = [UNKNOWN if pd.isna(v) else str(v) for v in nodules[name]]
    return {name: labels for name, labels in groups.items() if set(labels) != {UNKNOWN}}


def _ordered(labels: list[str]) -> list[str]:
    """The distinct groups: size bands in size order, others sorted; ``unknown`` last."""
    known = set(labels) - {UNKNOWN}
    order = [g for g in SIZE_LABELS if g in known] or sorted(known)
    return order + [UNKNOWN] * (UNKNOWN in labels)


def _without_other_hits(
    candidates: pd.DataFrame, nodules: pd.DataFrame, keep: np.ndarray
) -> pd.DataFrame:
    """``candidates`` less those that hit a nodule outside ``keep`` (a mask over nodules' rows)."""
    hit = luna16.match_candidates(candidates, nodules)["nodule_index"].to_numpy()
    other = (hit >= 0) & ~keep[np.maximum(hit, 0)]
    return candidates[~other]


def _scored(
    candidates: pd.DataFrame, nodules: pd.DataFrame, scans: list[str], n_boot: int, seed: int
) -> dict:
    """Estimate and interval of sensitivity and FPs per scan at the operating point, and CPM."""
    detected = candidates[candidates["detected"].to_numpy(bool)]
    at_point = luna16.bootstrap_froc(detected, nodules, scans, n_boot, seed)
    curve = luna16.bootstrap_froc(candidates, nodules, scans, n_boot, seed)
    out = {}
    for metric, boot in (
        ("sensitivity", at_point["sensitivity"]),
        ("fp_per_scan", at_point["fp_per_scan"]),
        ("cpm", curve["cpm"]),
    ):
        out.update(
            {metric: boot["estimate"], f"{metric}_lo": boot["lo"], f"{metric}_hi": boot["hi"]}
        )
    return out


def report(
    candidates: pd.DataFrame,
    nodules: pd.DataFrame,
    cases: list[dict],
    n_bootstrap: int,
    seed: int,
) -> pd.DataFrame:
    """One row per subgroup (:data:`COLUMNS`), the first one ``all`` (the whole split).

    ``cases`` and ``nodules`` count what each row stands on: the group's cases and their nodules
    (case-level), or the group's nodules and the cases that hold them (nodule-level).

    Args:
        candidates: every candidate of the split, with ``seriesuid``, world ``coordX/Y/Z``,
            ``score`` and ``detected`` (kept by the operating point).
        nodules: the split's ``nodules.csv`` rows (positions 0..n-1).
        cases: the split's ``index.json`` entries.
        n_bootstrap: resamples per interval.
        seed: bootstrap seed.
    """
    uids = [case["seriesuid"] for case in cases]
    rows = [
        _row(
            "all",
            "all",
            "split",
            len(uids),
            len(nodules),
            _scored(candidates, nodules, uids, n_bootstrap, seed),
        )
    ]
    for attribute, labels in case_groups(cases).items():
        for group in _ordered(labels):
            scans = [uid for uid, label in zip(uids, labels) if label == group]
            mine = nodules[nodules["seriesuid"].isin(scans)]
            theirs = candidates[candidates["seriesuid"].isin(scans)]
            scored = _scored(theirs, mine, scans, n_bootstrap, seed)
            rows.append(_row(attribute, group, "case", len(scans), len(mine), scored))
    for attribute, labels in nodule_groups(nodules).items():
        for group in _ordered(labels):
            keep = np.array(labels) == group
            kept = _without_other_hits(candidates, nodules, keep)
            scored = _scored(kept, nodules[keep], uids, n_bootstrap, seed)
            scored.update(fp_per_scan=np.nan, fp_per_scan_lo=np.nan, fp_per_scan_hi=np.nan)
            holding = int(nodules.loc[keep, "seriesuid"].nunique())  # cases with such a nodule
            rows.append(_row(attribute, group, "nodule", holding, int(keep.sum()), scored))
    return _flag(pd.DataFrame(rows))


def _row(attribute: str, group: str, level: str, cases: int, nodules: int, scored: dict) -> dict:
    subgroup = "all" if level == "split" else f"{attribute}={group}"
    return {
        "subgroup": subgroup,
        "attribute": attribute,
        "group": group,
        "level": level,
        "cases": cases,
        "nodules": nodules,
        **scored,
    }


def _flag(frame: pd.DataFrame) -> pd.DataFrame:
    """``flagged``: an interval wholly on the worse side of the ``all`` row's estimate."""
    overall = frame.iloc[0]
    worse = {
        "sensitivity": frame["sensitivity_hi"] < overall["sensitivity"],
        "cpm": frame["cpm_hi"] < overall["cpm"],
        "fp_per_scan": frame["fp_per_scan_lo"] > overall["fp_per_scan"],
    }
    frame["flagged_metrics"] = [
        " ".join(m for m in METRICS if worse[m].iloc[i]) for i in range(len(frame))
    ]
    frame["flagged"] = frame["flagged_metrics"] != ""
    return frame[COLUMNS]


def sensitivity_by(frame: pd.DataFrame, attribute: str) -> dict[str, float]:
    """Group -> sensitivity at the operating point, for one attribute of :func:`report`'s table."""
    rows = frame[frame["attribute"] == attribute]
    return {str(g): float(s) for g, s in zip(rows["group"], rows["sensitivity"])}
