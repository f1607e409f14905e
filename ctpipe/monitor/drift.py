"""Each feature of a window of records against the reference, with the tests monitoring
libraries use: two-sample Kolmogorov-Smirnov (flag), Wasserstein distance and PSI (size) for
numbers; chi-squared (flag) and Jensen-Shannon distance (size) for categories.

A feature is flagged when its test's p-value is below ``alpha`` divided by the number of features
compared (Bonferroni), so a window of the training distribution raises a false alarm on any
feature with probability about ``alpha``, whatever the number of features.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy import stats
from scipy.spatial.distance import jensenshannon

from ctpipe.monitor.record import CATEGORICAL, NUMERIC

PSI_BINS = 10
EPS = 1e-4


def values(records: list[dict], feature: str) -> list:
    return [r[feature] for r in records if r.get(feature) is not None]


def psi(reference: np.ndarray, window: np.ndarray) -> float:
    """Population stability index over the reference's deciles (PSI > 0.25: a large shift)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, PSI_BINS + 1)))
    if edges.size < 2:  # a constant reference: one bin, and everything else
        same = np.isclose(window, edges[0])
        ref, win = np.array([1.0, 0.0]), np.array([same.mean(), 1 - same.mean()])
    else:
        edges[0], edges[-1] = -np.inf, np.inf
        ref = np.histogram(reference, edges)[0] / reference.size
        win = np.histogram(window, edges)[0] / window.size
    ref, win = np.clip(ref, EPS, None), np.clip(win, EPS, None)
    return float(np.sum((win - ref) * np.log(win / ref)))


def numeric(feature: str, ref: list, win: list) -> dict:
    a, b = np.asarray(ref, float), np.asarray(win, float)
    if np.ptp(np.concatenate([a, b])) == 0:
        ks, p = 0.0, 1.0
    else:
        result = stats.ks_2samp(a, b)
        ks, p = float(result.statistic), float(result.pvalue)
    return {
        "feature": feature,
        "kind": "numeric",
        "test": "ks",
        "statistic": ks,
        "p_value": p,
        "wasserstein": float(stats.wasserstein_distance(a, b)),
        "psi": psi(a, b),
        "reference_median": float(np.median(a)),
        "window_median": float(np.median(b)),
    }


def categorical(feature: str, ref: list, win: list) -> dict:
    cats = sorted(set(ref) | set(win))
    r, w = Counter(ref), Counter(win)
    table = np.array([[r[c] for c in cats], [w[c] for c in cats]], float)
    if len(cats) < 2:
        chi, p = 0.0, 1.0
    else:
        chi, p = (float(v) for v in stats.chi2_contingency(table)[:2])
    pr, pw = table[0] / table[0].sum(), table[1] / table[1].sum()
    return {
        "feature": feature,
        "kind": "categorical",
        "test": "chi2",
        "statistic": chi,
        "p_value": p,
        "jensen_shannon": float(jensenshannon(pr, pw, base=2)),
        "reference_share": dict(zip(cats, np.round(pr, 4).tolist())),
        "window_share": dict(zip(cats, np.round(pw, 4).tolist())),
    }


def compare(
    reference: list[dict], window: list[dict], alpha: float = 0.01, min_n: int = 5
) -> list[dict]:
    """One result per feature present (at least ``min_n`` values) on both sides."""
    results = []
    for feature in NUMERIC + CATEGORICAL:
        ref, win = values(reference, feature), values(window, feature)
        if len(ref) < min_n or len(win) < min_n:
            continue
        test = categorical if feature in CATEGORICAL else numeric
        result = test(feature, ref, win)
        result.update(n_reference=len(ref), n_window=len(win))
        results.append(result)
    threshold = alpha / max(len(results), 1)
    for result in results:
        result["drift"] = result["p_value"] < threshold
        result["threshold"] = threshold
    return results
