"""Voxel metrics and LUNA16 FROC / CPM against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from monai.metrics.froc import compute_froc_curve_data, compute_froc_score

from ctpipe.evaluation.luna16 import (
    LUNA16_FP_RATES,
    _Scored,
    bootstrap_froc,
    froc,
    match_candidates,
    operating_point,
    sensitivity_at_rates,
)
from ctpipe.evaluation.overlap import aggregate, voxel_metrics

SPACING_KJI = (2.5, 0.7, 1.3)  # anisotropic, and different on every axis, to catch axis mix-ups


# --------------------------------------------------------------------------------------------
# Voxel metrics
# --------------------------------------------------------------------------------------------


def test_dice_iou_of_two_shifted_boxes():
    truth = np.zeros((8, 8, 10), dtype=bool)
    pred = truth.copy()
    truth[0:4, 0:5, 0:6] = True  # 120 voxels
    pred[0:4, 0:5, 1:7] = True  # 120 voxels, 4 * 5 * 5 = 100 shared
    m = voxel_metrics(pred, truth, SPACING_KJI)
    assert m["dice"] == pytest.approx(2 * 100 / 240)
    assert m["iou"] == pytest.approx(100 / 140)


@pytest.mark.parametrize(
    ("axis", "a", "b", "expected_mm"),
    [(0, 3, 5, 2 * 2.5), (2, 2, 5, 3 * 1.3), (1, 1, 5, 4 * 0.7)],
)
def test_hd95_of_parallel_planes_uses_spacing_of_the_shifted_axis(axis, a, b, expected_mm):
    # One-voxel-thick planes are all surface, and every surface voxel of one plane is exactly
    # (b - a) steps from the other plane, so every distance (and any percentile) is known.
    truth = np.zeros((10, 12, 14), dtype=bool)
    pred = truth.copy()
    truth[(slice(None),) * axis + (a,)] = True
    pred[(slice(None),) * axis + (b,)] = True
    m = voxel_metrics(pred, truth, SPACING_KJI, surface_tolerance_mm=expected_mm - 0.1)
    assert m["hd95_mm"] == pytest.approx(expected_mm, rel=1e-5)  # MONAI computes in float32
    assert m["surface_dice"] == 0.0
    assert voxel_metrics(pred, truth, SPACING_KJI, expected_mm + 0.1)["surface_dice"] == 1.0
    assert m["dice"] == 0.0


def test_hd95_of_single_voxels_is_their_distance():
    truth = np.zeros((10, 10, 10), dtype=bool)
    pred = truth.copy()
    truth[4, 4, 4] = True
    pred[6, 5, 1] = True
    expected = math.sqrt((2 * 2.5) ** 2 + (1 * 0.7) ** 2 + (3 * 1.3) ** 2)
    assert voxel_metrics(pred, truth, SPACING_KJI)["hd95_mm"] == pytest.approx(expected, rel=1e-5)


def test_extra_plane_gives_known_partial_scores():
    # truth: plane k=2 (N voxels); pred: the same plane plus a far plane k=7 (12.5 mm away).
    truth = np.zeros((10, 6, 7), dtype=bool)
    truth[2] = True
    pred = truth.copy()
    pred[7] = True
    m = voxel_metrics(pred, truth, SPACING_KJI, surface_tolerance_mm=1.0)
    assert m["dice"] == pytest.approx(2 / 3)  # 2N / (2N + N)
    assert m["iou"] == pytest.approx(1 / 2)  # N / 2N
    assert m["surface_dice"] == pytest.approx(2 / 3)  # (N + N) surface voxels agree of 3N
    assert m["hd95_mm"] == pytest.approx(12.5, rel=1e-5)  # half of pred's surface is 12.5 mm off


def test_empty_masks_follow_the_documented_rule():
    empty = np.zeros((6, 6, 6), dtype=bool)
    full = empty.copy()
    full[2:4, 2:4, 2:4] = True
    both = voxel_metrics(empty, empty, SPACING_KJI)
    assert (both["dice"], both["iou"], both["surface_dice"]) == (1.0, 1.0, 1.0)
    assert math.isnan(both["hd95_mm"])
    for pred, truth in [(full, empty), (empty, full)]:
        one = voxel_metrics(pred, truth, SPACING_KJI)
        assert (one["dice"], one["iou"], one["surface_dice"]) == (0.0, 0.0, 0.0)
        assert math.isnan(one["hd95_mm"])


def test_voxel_metrics_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same 3D shape"):
        voxel_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), SPACING_KJI)


def test_aggregate_skips_nan_and_counts_contributors():
    out = aggregate(
        [
            {"dice": 1.0, "hd95_mm": float("nan")},
            {"dice": 0.5, "hd95_mm": 2.0},
            {"dice": 0.0, "hd95_mm": 4.0},
        ]
    )
    assert out["n_cases"] == 3
    assert out["dice"] == pytest.approx(0.5) and out["dice_n"] == 3
    assert out["hd95_mm"] == pytest.approx(3.0) and out["hd95_mm_n"] == 2
    none = aggregate([{"hd95_mm": float("nan")}])
    assert math.isnan(none["hd95_mm"]) and none["hd95_mm_n"] == 0


# --------------------------------------------------------------------------------------------
# LUNA16 matching and FROC
# --------------------------------------------------------------------------------------------


def nodules_frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])


def candidates_frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "score"])


# Five scans: A has two nodules, B one, C one that is missed, D only a false positive, E nothing.
NODULES = nodules_frame(
    [
        ("A", 0.0, 0.0, 0.0, 10.0),  # 0
        ("A", 50.0, 0.0, 0.0, 6.0),  # 1: only a candidate 3.5 mm away, outside its 3 mm radius
        ("B", 0.0, 0.0, 0.0, 8.0),  # 2
        ("C", 10.0, 10.0, 10.0, 20.0),  # 3: missed
    ]
)
CANDIDATES = candidates_frame(
    [
        ("A", 1.0, 0.0, 0.0, 0.9),  # TP of nodule 0
        ("A", 0.0, 2.0, 0.0, 0.6),  # second hit on nodule 0: ignored
        ("A", 53.5, 0.0, 0.0, 0.8),  # FP: outside nodule 1's radius
        ("A", 100.0, 100.0, 100.0, 0.3),  # FP
        ("B", 0.0, 0.0, 3.9, 0.7),  # TP of nodule 2 (3.9 < 4)
        ("C", 40.0, 40.0, 40.0, 0.95),  # FP, the highest score of all
        ("C", 10.0, 10.0, 25.0, 0.7),  # FP 15 mm from nodule 3, tied with B's TP
        ("D", 0.0, 0.0, 0.0, 0.2),  # FP: nodules of other scans at these coordinates do not count
    ]
)
SCANS = ["A", "B", "C", "D", "E"]
# By hand, thresholds 0.95, 0.9, 0.8, 0.7 (TP + FP), 0.3, 0.2 give (FP, TP) = (1, 0), (1, 1),
# (2, 1), (3, 2), (4, 2), (5, 2), over 5 scans and 4 nodules:
EXPECTED_FPS = [0.0, 0.2, 0.2, 0.4, 0.6, 0.8, 1.0]
EXPECTED_SENS = [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.5]
# 1/8 on the flat start; 1/4 on the flat (0.2, 0.25)-(0.4, 0.25); 1/2 halfway up (0.4, 0.25)-(0.6,
# 0.5); 1 and beyond: the last value.
EXPECTED_AT = [0.0, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5]


def test_match_candidates_on_the_hand_built_scans():
    m = match_candidates(CANDIDATES, NODULES)
    assert m["nodule_index"].tolist() == [0, 0, -1, -1, 2, -1, -1, -1]
    assert m["is_tp"].tolist() == [True, False, False, False, True, False, False, False]
    assert list(m.columns[:5]) == list(CANDIDATES.columns)


def test_match_rules_boundary_nearest_unknown_diameter_and_index():
    nodules = nodules_frame(
        [
            ("S", 0.0, 0.0, 0.0, 20.0),
            ("S", 6.0, 0.0, 0.0, 20.0),  # overlaps nodule 0
            ("T", 0.0, 0.0, 0.0, 6.0),
            ("U", 0.0, 0.0, 0.0, -1.0),  # LUNA16 "no diameter": matched as 10 mm
            ("V", 0.0, 0.0, 0.0, 10.0),
        ]
    )
    cands = candidates_frame(
        [
            ("S", 4.0, 0.0, 0.0, 0.5),  # in both radii, nearer nodule 1
            ("S", 1.0, 0.0, 0.0, 0.4),  # in both radii, nearer nodule 0
            ("T", 3.0, 0.0, 0.0, 0.9),  # exactly on the radius: not a hit (strict, as LUNA16)
            ("U", 0.0, 4.9, 0.0, 0.9),  # within 5 mm
            ("V", 0.0, 0.0, 1.0, 0.2),  # two hits on one nodule: the later, higher one is the TP
            ("V", 0.0, 0.0, 2.0, 0.7),
        ],
    ).set_axis([10, 11, 12, 13, 14, 15])
    m = match_candidates(cands, nodules)
    assert m.index.tolist() == [10, 11, 12, 13, 14, 15]
    assert m["nodule_index"].tolist() == [1, 0, -1, 3, 4, 4]
    assert m["is_tp"].tolist() == [True, True, False, True, False, True]


def test_froc_matches_the_hand_computed_curve_and_cpm():
    r = froc(CANDIDATES, NODULES, n_scans=5)
    np.testing.assert_allclose(r["curve"]["fps_per_scan"], EXPECTED_FPS)
    np.testing.assert_allclose(r["curve"]["sensitivity"], EXPECTED_SENS)
    np.testing.assert_allclose(r["curve"]["thresholds"], [np.inf, 0.95, 0.9, 0.8, 0.7, 0.3, 0.2])
    assert list(r["sensitivity_at"]) == list(LUNA16_FP_RATES)
    np.testing.assert_allclose(list(r["sensitivity_at"].values()), EXPECTED_AT)
    assert r["cpm"] == pytest.approx(2.625 / 7)
    assert r["sensitivity"] == pytest.approx(0.5) and r["fp_per_scan"] == pytest.approx(1.0)
    assert (r["n_nodules"], r["n_tp"], r["n_fp"], r["n_ignored"]) == (4, 2, 5, 1)


def test_froc_agrees_with_monai_curve_and_score():
    m = match_candidates(CANDIDATES, NODULES)
    tp = m.loc[m["is_tp"], "score"].to_numpy()
    # MONAI never counts its lowest threshold; a -inf FP below every score makes it harmless.
    fp = np.r_[m.loc[m["nodule_index"] < 0, "score"].to_numpy(), -np.inf]
    fps, sens = compute_froc_curve_data(fp, tp, num_targets=len(NODULES), num_images=5)
    np.testing.assert_allclose(fps[::-1], EXPECTED_FPS)
    np.testing.assert_allclose(sens[::-1], EXPECTED_SENS)
    score = compute_froc_score(fps, sens, eval_thresholds=LUNA16_FP_RATES)
    assert froc(CANDIDATES, NODULES, n_scans=5)["cpm"] == pytest.approx(score)


def test_sensitivity_at_a_vertical_step_takes_the_top_like_np_interp():
    fps, sens = np.array([0.0, 0.25, 0.25, 0.5]), np.array([0.0, 0.0, 0.5, 0.75])
    rates = [0.125, 0.25, 0.375, 1.0]
    np.testing.assert_allclose(sensitivity_at_rates(fps, sens, rates), [0.0, 0.5, 0.625, 0.75])
    np.testing.assert_allclose(sensitivity_at_rates(fps, sens, rates), np.interp(rates, fps, sens))


def test_froc_without_nodules_has_nan_sensitivity():
    r = froc(CANDIDATES[CANDIDATES["seriesuid"] == "D"], NODULES.iloc[:0], n_scans=2)
    assert math.isnan(r["cpm"]) and math.isnan(r["sensitivity"])
    assert all(math.isnan(v) for v in r["sensitivity_at"].values())
    assert r["fp_per_scan"] == pytest.approx(0.5)


def test_froc_rejects_too_few_scans_and_missing_columns():
    with pytest.raises(ValueError, match="n_scans"):
        froc(CANDIDATES, NODULES, n_scans=3)
    with pytest.raises(ValueError, match="score"):
        froc(CANDIDATES.drop(columns="score"), NODULES, n_scans=5)


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_estimate_and_is_reproducible():
    a = bootstrap_froc(CANDIDATES, NODULES, SCANS, n_bootstrap=300, seed=3)
    assert a["cpm"]["estimate"] == pytest.approx(2.625 / 7)
    for interval in [a["cpm"], *a["sensitivity_at"].values()]:
        assert interval["lo"] <= interval["estimate"] <= interval["hi"]
    assert a["cpm"]["lo"] < a["cpm"]["hi"]  # five different scans: the CPM does vary
    assert bootstrap_froc(CANDIDATES, NODULES, SCANS, n_bootstrap=300, seed=3) == a


def test_bootstrap_of_identical_scans_is_degenerate():
    scans = ["s0", "s1", "s2", "s3"]
    nodules = nodules_frame(
        [row for s in scans for row in [(s, 0.0, 0.0, 0.0, 10.0), (s, 30.0, 0.0, 0.0, 10.0)]]
    )
    cands = candidates_frame(
        [
            row
            for s in scans
            for row in [(s, 0.0, 1.0, 0.0, 0.9), (s, 80.0, 0.0, 0.0, 0.5), (s, 30.0, 0.0, 1.0, 0.3)]
        ]
    )
    # Curve (0, 0), (0, 0.5), (1, 0.5), (1, 1): 0.5 below 1 FP/scan, 1.0 from 1 FP/scan on.
    b = bootstrap_froc(cands, nodules, scans, n_bootstrap=50, seed=0)
    assert b["cpm"]["estimate"] == pytest.approx(5.5 / 7)
    for interval in [b["cpm"], *b["sensitivity_at"].values()]:
        assert interval["lo"] == pytest.approx(interval["hi"])
        assert interval["lo"] == pytest.approx(interval["estimate"])
    assert b["n_undefined"] == 0


def test_weighting_a_scan_equals_copying_it_under_a_new_id():
    # Resample A, A, C, D: weights (2, 0, 1, 1, 0) over SCANS.
    matched = match_candidates(CANDIDATES, NODULES)
    scored = _Scored.build(matched, NODULES, pd.Index(SCANS))
    weighted = scored.curve(np.array([2, 0, 1, 1, 0]))

    def copy(frame: pd.DataFrame, uid: str, new: str) -> pd.DataFrame:
        return frame[frame["seriesuid"] == uid].assign(seriesuid=new)

    parts = [("A", "A#0"), ("A", "A#1"), ("C", "C#0"), ("D", "D#0")]
    cands = pd.concat([copy(CANDIDATES, u, n) for u, n in parts], ignore_index=True)
    nods = pd.concat([copy(NODULES, u, n) for u, n in parts], ignore_index=True)
    explicit = froc(cands, nods, n_scans=4)
    got = sensitivity_at_rates(weighted["fps_per_scan"], weighted["sensitivity"], LUNA16_FP_RATES)
    np.testing.assert_allclose(got, list(explicit["sensitivity_at"].values()))
    assert weighted["fps_per_scan"][-1] == pytest.approx(explicit["fp_per_scan"])
    assert weighted["sensitivity"][-1] == pytest.approx(explicit["sensitivity"])


def test_bootstrap_rejects_scans_outside_the_list():
    with pytest.raises(ValueError, match="not in seriesuids"):
        bootstrap_froc(CANDIDATES, NODULES, ["A", "B", "C"], n_bootstrap=5)


def test_operating_point_counts_a_nodule_whose_best_scoring_hit_is_not_detected():
    """Nodule 0 of scan A has two hits: one with the higher FROC score (the shape term ranks it
    first) whose peak is under the operating point, one that the mask keeps. The nodule is found
    at the operating point, in the sensitivity and in the confusion table alike."""
    nodules = nodules_frame([("A", 0.0, 0.0, 0.0, 10.0), ("A", 60.0, 0.0, 0.0, 10.0)])
    cands = candidates_frame(
        [
            ("A", 1.0, 0.0, 0.0, 0.97),  # best-scoring hit of nodule 0, not in the mask
            ("A", 0.0, 2.0, 0.0, 0.90),  # a hit of nodule 0 that the mask keeps
            ("A", 30.0, 30.0, 30.0, 0.95),  # a false detection
            ("A", 60.0, 1.0, 0.0, 0.5),  # the only hit of nodule 1, not in the mask
        ]
    ).assign(detected=[False, True, True, False])
    op = operating_point(cands, nodules, n_scans=2)
    assert op["sensitivity"] == 0.5 and op["fp_per_scan"] == 0.5
    table = op["confusion"]
    assert table.to_dict("records") == [
        {"actual": "nodule", "predicted": "nodule"},
        {"actual": "nodule", "predicted": "background"},
        {"actual": "background", "predicted": "nodule"},
    ]
    # Whatever is not detected plays no part: dropping those rows changes nothing.
    again = operating_point(cands[cands["detected"]], nodules, n_scans=2)
    assert again["confusion"].equals(table) and again["sensitivity"] == op["sensitivity"]
