"""scripts/tune_postprocessing.py: the sweep scores each pair as evaluate would."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctpipe.detect import candidates_from_probability
from ctpipe.geometry import Geometry, array_index_to_world

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tune_postprocessing.py"
spec = importlib.util.spec_from_file_location("tune_postprocessing", SCRIPT)
tune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tune)


def test_sweep_prefers_hysteresis_when_rims_are_uncertain_and_blobs_faint():
    geom = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    shape = (12, 12, 12)
    truth = np.zeros(shape, dtype=bool)
    truth[4:7, 4:7, 4:7] = True  # a 27-voxel nodule
    prob = np.zeros(shape)
    prob[4:7, 4:7, 4:7] = 0.4  # uncertain rim ...
    prob[5, 5, 5] = 0.95  # ... around a confident centre
    prob[9:11, 9:11, 9:11] = 0.6  # a faint false blob of 8 voxels
    empty = np.zeros(shape)
    empty[1:3, 1:3, 1:3] = 0.55  # a false blob in a nodule-free case
    uids = ["a", "b"]
    cands = pd.concat([candidates_from_probability(p, geom, 0.2).assign(seriesuid=u)
                       for p, u in zip([prob, empty], uids)], ignore_index=True)
    x, y, z = array_index_to_world(np.array([5.0, 5.0, 5.0]), geom).ravel()
    nodules = pd.DataFrame({"seriesuid": ["a"], "coordX": [x], "coordY": [y], "coordZ": [z], "diameter_mm": [3.0]})
    table = tune.sweep([prob, empty], [truth, np.zeros(shape, bool)], cands, nodules, [0.3, 0.5], [0.5, 0.9])
    row = table.set_index(["threshold", "component_threshold"])
    # Plain 0.5: only the centre voxel and the false blob -> 2 / (9 + 27).
    assert row.loc[(0.5, 0.5), "dice"] == pytest.approx(2 * 1 / (9 + 27))
    # 0.3 with components peaking >= 0.9: the whole nodule, no false blob.
    assert row.loc[(0.3, 0.9), "dice"] == pytest.approx(1.0)
    assert row.loc[(0.3, 0.9), "fp_per_scan"] == 0 and row.loc[(0.3, 0.9), "sensitivity"] == 1
    # The nodule-free case's blob counts in the pooled Dice and the false positives.
    assert row.loc[(0.3, 0.5), "dice_pooled"] == pytest.approx(2 * 27 / (27 + 8 + 8 + 27))
    assert row.loc[(0.3, 0.5), "fp_per_scan"] == pytest.approx(1.0)
    best = table.sort_values(["dice", "dice_pooled"], ascending=False).iloc[0]
    assert (best["threshold"], best["component_threshold"]) == (0.3, 0.9)


def test_shape_sweep_scores_the_ranking_and_picks_the_smallest_best_weight():
    geom = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    k, j, i = np.mgrid[:20, :20, :30]
    prob = np.zeros((20, 20, 30))
    prob[(k - 6) ** 2 + (j - 6) ** 2 + (i - 6) ** 2 <= 9] = 0.98  # the nodule, a ball
    prob[14:16, 14:16, 2:28] = 0.99  # a vessel taken for a nodule, more confident
    cands = candidates_from_probability(prob, geom, 0.2).assign(seriesuid="a")
    x, y, z = array_index_to_world(np.array([6.0, 6.0, 6.0]), geom).ravel()
    nodules = pd.DataFrame({"seriesuid": ["a"], "coordX": [x], "coordY": [y], "coordZ": [z], "diameter_mm": [7.0]})
    table = tune.sweep_shape(cands, nodules, 2, [0, 1, 2, 8]).set_index("shape_weight")
    # Peak ranking: the vessel (0.5 FP per scan, 2 scans) comes before the nodule, so the
    # sensitivity is 0 at 1/8 and 1/4 FP per scan and 1 from 1/2 on: CPM 5/7.
    assert table.loc[0, "cpm"] == pytest.approx(5 / 7)
    assert table.loc[0, "sens@0.125"] == 0 and table.loc[0, "sens@0.5"] == 1
    # Any positive weight here puts the ball first: found before any false positive.
    assert (table.loc[[1, 2, 8], "cpm"] == 1).all()
    assert tune.best_shape_weight(table.reset_index()) == 1
