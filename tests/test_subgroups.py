"""The subgroup report on hand-built scans: figures per case- and nodule-level group, their counts,
the flag of a group that does worse than the split, and a nodule table without the kind columns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ctpipe.evaluation import luna16, subgroups

CASES = [
    {"seriesuid": "A", "sex": "F", "scanner": "X", "slice_thickness_mm": 1.0},
    {"seriesuid": "B", "sex": "M", "scanner": "X", "slice_thickness_mm": 1.0},
    {"seriesuid": "C", "sex": "F", "scanner": "Y", "slice_thickness_mm": 2.5},
    {"seriesuid": "D", "sex": "M", "scanner": "Y", "slice_thickness_mm": 2.5},
]
NODULES = pd.DataFrame(
    {
        "seriesuid": ["A", "B", "C", "D"],
        "coordX": [0.0, 0.0, 0.0, 0.0],
        "coordY": [0.0, 0.0, 0.0, 0.0],
        "coordZ": [0.0, 0.0, 0.0, 0.0],
        "diameter_mm": [10.0, 5.0, 10.0, 20.0],
        "type": ["isolated", "isolated", "juxta_vascular", "juxta_vascular"],
    }
)


def candidate(uid: str, x: float, score: float, detected: bool) -> dict:
    return {"seriesuid": uid, "coordX": x, "coordY": 0.0, "coordZ": 0.0, "score": score,
            "detected": detected}  # fmt: skip


# A and B: their (isolated) nodules found at the operating point, no false positive. C and D: the
# juxta-vascular nodules missed at the operating point (C's only hit scores high but is not kept),
# and three detected false positives each.
CANDIDATES = pd.DataFrame(
    [
        candidate("A", 1.0, 0.9, True),
        candidate("B", 0.5, 0.8, True),
        candidate("C", 2.0, 0.85, False),  # hits C's nodule, high but not kept
        *[candidate(uid, 50.0 + k, 0.6 - 0.1 * k, True) for uid in "CD" for k in range(3)],
    ]
)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return subgroups.report(CANDIDATES, NODULES, CASES, n_bootstrap=200, seed=0)


def row(table: pd.DataFrame, subgroup: str) -> pd.Series:
    return table.set_index("subgroup").loc[subgroup]


def test_the_split_row_is_the_operating_point(table):
    overall = row(table, "all")
    point = luna16.operating_point(CANDIDATES, NODULES, len(CASES))
    assert overall["sensitivity"] == point["sensitivity"] == 0.5
    assert overall["fp_per_scan"] == point["fp_per_scan"] == 1.5
    assert overall["cpm"] == pytest.approx(luna16.froc(CANDIDATES, NODULES, 4)["cpm"])
    assert overall["sensitivity_lo"] <= 0.5 <= overall["sensitivity_hi"]
    assert (overall["cases"], overall["nodules"], overall["flagged"]) == (4, 4, False)


def test_a_group_whose_nodules_are_all_missed_is_flagged(table):
    missed = row(table, "type=juxta_vascular")
    assert (missed["sensitivity"], missed["sensitivity_hi"]) == (0.0, 0.0)
    assert missed["flagged"] and "sensitivity" in missed["flagged_metrics"]
    assert (missed["level"], missed["cases"], missed["nodules"]) == ("nodule", 2, 2)
    assert np.isnan(missed["fp_per_scan"])  # false positives belong to scans, not to nodule types
    found = row(table, "type=isolated")
    assert found["sensitivity"] == 1.0 and not found["flagged"]


def test_a_case_group_with_more_false_positives_is_flagged_on_them(table):
    worse = row(table, "scanner=Y")
    assert (worse["cases"], worse["nodules"]) == (2, 2)
    assert worse["fp_per_scan"] == worse["fp_per_scan_lo"] == 3.0
    assert worse["flagged_metrics"].split() == ["sensitivity", "fp_per_scan"]  # CPM: C's hit
    better = row(table, "scanner=X")
    assert better["fp_per_scan"] == 0.0 and better["sensitivity"] == 1.0 and not better["flagged"]
    assert row(table, "slice_thickness=2.5 mm")["flagged"]


def test_a_hit_on_another_groups_nodule_is_neither_true_nor_false(table):
    """C's low hit on its juxta-vascular nodule is not a false positive of the isolated group."""
    isolated = NODULES["type"] == "isolated"
    kept = CANDIDATES.drop(index=2)  # candidate("C", 2.0, ...)
    expected = luna16.froc(kept, NODULES[isolated], 4)["cpm"]
    assert row(table, "type=isolated")["cpm"] == pytest.approx(expected)
    assert expected > luna16.froc(CANDIDATES, NODULES[isolated], 4)["cpm"]
    assert row(table, "type=juxta_vascular")["cpm"] == 0.5  # that hit counts for its own group


def test_size_bands_are_lung_rads_bands(table):
    assert [subgroups.size_band(d) for d in (-1, 3, 5.99, 6, 8, 14.9, 15, 30)] == [
        "unknown", "<6 mm", "<6 mm", "6-8 mm", "8-15 mm", "8-15 mm", ">=15 mm", ">=15 mm"
    ]  # fmt: skip
    sizes = table[table["attribute"] == "size"]
    assert list(sizes["group"]) == ["<6 mm", "8-15 mm", ">=15 mm"]  # in size order
    assert sizes["nodules"].sum() == len(NODULES)


def test_without_kind_columns_or_case_attributes_those_groups_are_left_out():
    bare = [{"seriesuid": c["seriesuid"]} for c in CASES]
    table = subgroups.report(CANDIDATES, NODULES.drop(columns="type"), bare, 50, 0)
    assert set(table["attribute"]) == {"all", "size"}
    assert subgroups.sensitivity_by(table, "type") == {}
    assert list(table.columns) == subgroups.COLUMNS


def test_unknown_values_form_their_own_group():
    cases = [dict(c, sex=None) if c["seriesuid"] == "D" else c for c in CASES]
    nodules = NODULES.assign(type=["isolated", None, "juxta_vascular", "juxta_vascular"])
    table = subgroups.report(CANDIDATES, nodules, cases, 50, 0)
    assert list(table.loc[table["attribute"] == "sex", "group"]) == ["F", "M", "unknown"]
    by_type = subgroups.sensitivity_by(table, "type")
    assert by_type == {"isolated": 1.0, "juxta_vascular": 0.0, "unknown": 1.0}
