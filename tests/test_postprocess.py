"""Post-processing chosen on validation: the sweeps by hand, and the stage on two models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import ndimage

from ctpipe.geometry import Geometry, array_index_to_world
from ctpipe.model import data, infer
from ctpipe.postprocessing import choose
from ctpipe.postprocessing.candidates import candidates_from_probability
from stages import postprocess as stage

GRIDS = {
    "threshold": "auto",
    "threshold_grid": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "component_threshold": "auto",
    "component_threshold_grid": [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99],
    "shape_weight": "auto",
    "shape_weight_grid": [0, 1, 2, 4],
}


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
    cases = [
        choose.Case(prob, truth, geom, "a"),
        choose.Case(empty, np.zeros(shape, bool), geom, "b"),
    ]
    x, y, z = array_index_to_world(np.array([5.0, 5.0, 5.0]), geom).ravel()
    nodules = pd.DataFrame(
        {"seriesuid": ["a"], "coordX": [x], "coordY": [y], "coordZ": [z], "diameter_mm": [3.0]}
    )
    table = choose.sweep_masks(cases, nodules, [0.3, 0.5], [0.5, 0.9], 0.0)
    row = table.set_index(["threshold", "component_threshold"])
    # Plain 0.5: only the centre voxel and the false blob -> 2 / (9 + 27).
    assert row.loc[(0.5, 0.5), "dice"] == pytest.approx(2 * 1 / (9 + 27))
    # 0.3 with components peaking >= 0.9: the whole nodule, no false blob.
    assert row.loc[(0.3, 0.9), "dice"] == pytest.approx(1.0)
    assert row.loc[(0.3, 0.9), "fp_per_scan"] == 0 and row.loc[(0.3, 0.9), "sensitivity"] == 1
    # The nodule-free case's blob counts in the pooled Dice and the false positives.
    assert row.loc[(0.3, 0.5), "dice_pooled"] == pytest.approx(2 * 27 / (27 + 8 + 8 + 27))
    assert row.loc[(0.3, 0.5), "fp_per_scan"] == pytest.approx(1.0)
    best = choose.best_pair(table)
    assert (best["threshold"], best["component_threshold"]) == (0.3, 0.9)


def test_best_pair_breaks_ties_by_pooled_dice_then_false_positives_then_lower_values():
    table = pd.DataFrame(
        [
            {
                "threshold": 0.5,
                "component_threshold": 0.9,
                "dice": 0.8,
                "dice_pooled": 0.7,
                "fp_per_scan": 1.0,
            },
            {
                "threshold": 0.4,
                "component_threshold": 0.9,
                "dice": 0.8,
                "dice_pooled": 0.7,
                "fp_per_scan": 0.5,
            },
            {
                "threshold": 0.6,
                "component_threshold": 0.7,
                "dice": 0.8,
                "dice_pooled": 0.7,
                "fp_per_scan": 0.5,
            },
            {
                "threshold": 0.3,
                "component_threshold": 0.5,
                "dice": 0.8,
                "dice_pooled": 0.6,
                "fp_per_scan": 0.0,
            },
            {
                "threshold": 0.8,
                "component_threshold": 0.5,
                "dice": 0.7,
                "dice_pooled": 0.9,
                "fp_per_scan": 0.0,
            },
        ]
    )
    best = choose.best_pair(table)
    assert (best["threshold"], best["component_threshold"]) == (0.4, 0.9)


def test_shape_sweep_scores_the_ranking_and_picks_the_smallest_best_weight():
    geom = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    k, j, i = np.mgrid[:20, :20, :30]
    prob = np.zeros((20, 20, 30))
    prob[(k - 6) ** 2 + (j - 6) ** 2 + (i - 6) ** 2 <= 9] = 0.98  # the nodule, a ball
    prob[14:16, 14:16, 2:28] = 0.99  # a vessel taken for a nodule, more confident
    cands = candidates_from_probability(prob, geom, 0.2).assign(seriesuid="a")
    x, y, z = array_index_to_world(np.array([6.0, 6.0, 6.0]), geom).ravel()
    nodules = pd.DataFrame(
        {"seriesuid": ["a"], "coordX": [x], "coordY": [y], "coordZ": [z], "diameter_mm": [7.0]}
    )
    table = choose.sweep_shape(cands, nodules, 2, [0, 1, 2, 8]).set_index("shape_weight")
    # Peak ranking: the vessel (0.5 FP per scan, 2 scans) comes before the nodule, so the
    # sensitivity is 0 at 1/8 and 1/4 FP per scan and 1 from 1/2 on: CPM 5/7.
    assert table.loc[0, "cpm"] == pytest.approx(5 / 7)
    assert table.loc[0, "sens@0.125"] == 0 and table.loc[0, "sens@0.5"] == 1
    # Any positive weight here puts the ball first: found before any false positive.
    assert (table.loc[[1, 2, 8], "cpm"] == 1).all()
    assert choose.best_shape_weight(table.reset_index()) == 1


def test_grid_is_the_fixed_value_when_params_set_one():
    assert choose.grid(0.45, GRIDS["threshold_grid"], "threshold") == [0.45]
    assert choose.grid("auto", [4, 0, 2, 1, 2], "shape_weight") == [0.0, 1.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="threshold_grid is empty"):
        choose.grid("auto", [], "threshold")


def test_load_names_the_file_and_what_is_missing(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"chosen": {"threshold": 0.5}}))
    with pytest.raises(
        ValueError, match=r"p.json: 'chosen' lacks \['component_threshold', 'shape_weight'\]"
    ):
        choose.load(tmp_path / "p.json")


# Two "models" of the same data, as functions of the image (the tiny cohort's nodules are 2.5
# brighter than its background): a confident one, and one that is sure only at each nodule's
# centre and also sees a faint false blob. Their best post-processing differs.
def confident(image: np.ndarray) -> np.ndarray:
    return np.where(image > 0.25, 0.95, 0.05)


def hesitant(image: np.ndarray) -> np.ndarray:
    inside = image > 0.25
    prob = np.where(inside, 0.45, 0.05)
    labels, n = ndimage.label(inside)
    for idx in ndimage.maximum_position(image, labels, range(1, n + 1)):
        prob[idx] = 0.99
    prob[0:2, 0:3, 0:3] = 0.6  # a false blob far from every nodule
    return prob


REAL_LOAD_CASE = data.load_case


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_models) -> dict:
    root = tmp_path_factory.mktemp("post")
    processed = tiny_models.make_processed(root / "processed")
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["inference"].update(roi_size=32, views=["axial"], mirror_axes=[], min_candidate_mm3=0)
    params["postprocess"].update(GRIDS)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {
        "root": root,
        "processed": processed,
        "model": tiny_models.make_checkpoint(root / "model.pt"),
        "params": root / "params.yaml",
    }


def run_stage(w: dict, out: Path, model_fn, monkeypatch) -> tuple[dict, list[str]]:
    """The stage's main on the tiny dataset, with ``model_fn`` as the network's probabilities;
    return the chosen post-processing and the cases it read."""
    read = []

    def recording_load(processed, case_id):
        read.append(case_id)
        return REAL_LOAD_CASE(processed, case_id)

    monkeypatch.setattr(data, "load_case", recording_load)
    monkeypatch.setattr(infer, "predict_volume", lambda predictor, image, *a, **k: model_fn(image))
    assert (
        stage.main(
            [
                str(w["model"]),
                str(w["processed"]),
                str(out / "postprocessing.json"),
                "--tables",
                str(out / "tables"),
                "--params",
                str(w["params"]),
                "--metrics",
                str(out / "postprocess.json"),
            ]
        )
        == 0
    )
    return json.loads((out / "postprocessing.json").read_text()), read


def test_two_models_get_their_own_post_processing_from_validation_only(
    workspace, tmp_path, monkeypatch
):
    index = data.load_index(workspace["processed"])
    val = [c["case_id"] for c in data.cases_in(index, "val")]
    a, read_a = run_stage(workspace, tmp_path / "a", confident, monkeypatch)
    b, read_b = run_stage(workspace, tmp_path / "b", hesitant, monkeypatch)
    assert read_a == val and read_b == val  # only the validation cases, test and train never
    assert a["chosen_on"] == "val" and a["val"]["cases"] == len(val)
    # Confident: every pair under its 0.95 is as good as any other; the lowest values win the tie.
    assert (a["chosen"]["threshold"], a["chosen"]["component_threshold"]) == (0.3, 0.5)
    assert a["val"]["dice"] == pytest.approx(1.0, abs=0.01)
    # Hesitant: the rim needs a low voxel threshold and the false blob (0.6) a component threshold above it.
    assert b["chosen"]["threshold"] <= 0.4 and b["chosen"]["component_threshold"] == 0.7
    assert b["val"]["dice"] == pytest.approx(1.0, abs=0.01)
    assert a["chosen"] != b["chosen"]
    sweep = pd.read_csv(tmp_path / "b" / "tables" / "sweep.csv")
    assert len(sweep) == 6 * 7 and {"dice", "dice_pooled", "sensitivity", "fp_per_scan"} <= set(
        sweep.columns
    )
    metrics = json.loads((tmp_path / "b" / "postprocess.json").read_text())
    assert metrics["component_threshold"] == 0.7 and "val_dice" in metrics


def test_a_value_fixed_in_params_is_used_as_is(workspace, tmp_path, monkeypatch):
    params = yaml.safe_load(workspace["params"].read_text())
    params["postprocess"]["component_threshold"] = 0.98
    fixed = {**workspace, "params": tmp_path / "params.yaml"}
    fixed["params"].write_text(yaml.safe_dump(params))
    chosen, _ = run_stage(fixed, tmp_path, hesitant, monkeypatch)
    assert chosen["chosen"]["component_threshold"] == 0.98
    assert chosen["fixed_by_params"] == ["component_threshold"]


def test_keep_grid_reads_off_fixed_and_auto():
    assert choose.keep_grid({}) == [(None, None)]
    assert choose.keep_grid({"keep_volume_mm3": None, "keep_level": 0.5}) == [(None, None)]
    assert choose.keep_grid({"keep_volume_mm3": 500, "keep_level": 0.4}) == [(0.4, 500.0)]
    auto = {
        "keep_volume_mm3": "auto",
        "keep_volume_mm3_grid": [1000, None, 300],
        "keep_level": "auto",
        "keep_level_grid": [0.5, 0.3],
    }
    assert choose.keep_grid(auto) == [
        (None, None),
        (0.3, 300.0),
        (0.3, 1000.0),
        (0.5, 300.0),
        (0.5, 1000.0),
    ]
    with pytest.raises(ValueError, match="keep_volume_mm3_grid is empty"):
        choose.keep_grid({"keep_volume_mm3": "auto", "keep_volume_mm3_grid": []})


@pytest.mark.parametrize(
    "cfg, reason",
    [
        ({"keep_volume_mm3": "big"}, r"keep_volume_mm3: 'big' is not a number"),
        ({"keep_volume_mm3": "auto", "keep_volume_mm3_grid": [None, "x"]}, r"grid: 'x' is not"),
        ({"keep_volume_mm3": -5, "keep_level": 0.5}, r"keep_volume_mm3: \[-5.0\] not > 0"),
        ({"keep_volume_mm3": 500, "keep_level": 1.5}, r"keep_level: \[1.5\] not in \(0, 1\]"),
        ({"keep_volume_mm3": 500, "keep_level_grid": [0.3, 0]}, r"keep_level: \[0.0\] not in"),
    ],
)
def test_keep_grid_names_the_param_and_the_reason_for_a_bad_value(cfg, reason):
    with pytest.raises(ValueError, match=reason):
        choose.keep_grid(cfg)


def _nodules_of_case_a(geom: Geometry, centres_kji, diameters_mm) -> pd.DataFrame:
    """Annotations (LUNA16 columns, world mm) of nodules at array indices ``centres_kji`` of case "a"."""
    xyz = [array_index_to_world(np.array(c), geom).ravel() for c in centres_kji]
    return pd.DataFrame(
        {
            "seriesuid": ["a"] * len(xyz),
            "coordX": [c[0] for c in xyz],
            "coordY": [c[1] for c in xyz],
            "coordZ": [c[2] for c in xyz],
            "diameter_mm": list(diameters_mm),
        }
    )


def test_large_rule_is_chosen_where_validation_has_a_large_faint_nodule_and_off_on_ties():
    geom = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    shape = (14, 14, 14)
    truth = np.zeros(shape, dtype=bool)
    truth[1:9, 1:9, 1:9] = True  # a 512-voxel nodule the network is unsure of
    prob = np.zeros(shape)
    prob[1:9, 1:9, 1:9] = 0.6
    prob[2, 2, 2] = 0.95  # its only voxel over the threshold
    small = np.zeros(shape, dtype=bool)
    small[11:13, 11:13, 11:13] = True  # a small nodule, confident
    prob[small] = 0.999
    cases = [choose.Case(prob, truth | small, geom, "a")]
    nodules = _nodules_of_case_a(geom, ([4.5] * 3, [11.5] * 3), [9.0, 2.5])
    keep = [(None, None), (0.5, 100.0), (0.5, 1000.0)]
    table = choose.sweep_masks(cases, nodules, [0.9], [0.99], 0.0, keep)
    row = table.assign(v=table["keep_volume_mm3"].fillna(-1)).set_index("v")
    assert row.loc[-1, "dice"] == pytest.approx(2 * 8 / (8 + 520))  # by peak: the large one lost
    assert row.loc[100.0, "dice"] == pytest.approx(1.0) and row.loc[100.0, "sensitivity"] == 1
    assert row.loc[1000.0, "dice"] == row.loc[-1, "dice"]  # 512 mm3 is under 1000
    best = choose.best_pair(table)
    assert (best["keep_level"], best["keep_volume_mm3"]) == (0.5, 100.0)
    # Without a large faint nodule every rule ties: off wins.
    prob[1:9, 1:9, 1:9] = 0.999
    table = choose.sweep_masks(cases, nodules, [0.9], [0.99], 0.0, keep)
    assert np.isnan(choose.best_pair(table)["keep_volume_mm3"])


def test_load_reads_the_large_rule_and_older_files_without_it(tmp_path):
    pair = {"threshold": 0.5, "component_threshold": 0.9, "shape_weight": 0.0}
    (tmp_path / "old.json").write_text(json.dumps({"chosen": pair}))
    old = choose.load(tmp_path / "old.json")
    assert old["keep_level"] is None and old["keep_volume_mm3"] is None
    rule = {"keep_level": 0.3, "keep_volume_mm3": 500}
    (tmp_path / "new.json").write_text(json.dumps({"chosen": {**pair, **rule}}))
    assert choose.load(tmp_path / "new.json") == {
        **pair,
        "keep_level": 0.3,
        "keep_volume_mm3": 500.0,
    }


def _dice_or_cpm_case() -> tuple[list[choose.Case], pd.DataFrame]:
    """A case where the threshold trades mask Dice for detection: a nodule with a faint halo on one
    face (in the mask below 0.7) and a small faint nodule (a candidate only below 0.55)."""
    geom = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    shape = (14, 14, 14)
    truth = np.zeros(shape, dtype=bool)
    truth[2:5, 2:5, 2:5] = True  # nodule A, 27 voxels
    truth[10:12, 10:12, 10:12] = True  # nodule B, 8 voxels
    prob = np.zeros(shape)
    prob[2:5, 2:5, 2:5] = 0.8
    prob[3, 3, 3] = 0.95
    prob[5, 2:5, 2:5] = 0.6  # A's halo: 9 voxels outside the truth
    prob[10:12, 10:12, 10:12] = 0.55  # B: found only by candidates at 0.5
    nodules = _nodules_of_case_a(geom, ([3.0] * 3, [10.5] * 3), [3.0, 2.0])
    return [choose.Case(prob, truth, geom, "a")], nodules


@pytest.mark.parametrize(
    "objective, threshold, dice, cpm",
    [
        ("dice", 0.7, 2 * 27 / (27 + 35), 0.5),  # A exact, B never a candidate
        ("dice+cpm", 0.5, 2 * 27 / (36 + 35), 1.0),  # A with its halo, B detected
    ],
)
def test_the_objective_decides_whether_the_threshold_may_trade_dice_for_detection(
    objective, threshold, dice, cpm
):
    cases, nodules = _dice_or_cpm_case()
    cfg = {
        **GRIDS,
        "threshold_grid": [0.5, 0.7],
        "component_threshold_grid": [0.9],
        "objective": objective,
        "min_candidate_mm3": 0.0,
    }
    result = choose.choose(cases, nodules, cfg)
    assert result["chosen"]["threshold"] == threshold
    assert result["chosen"]["shape_weight"] == 0.0  # every weight ties: the smallest
    assert result["val"]["dice"] == pytest.approx(dice)
    assert result["val"]["cpm"] == pytest.approx(cpm)
    # the shape table of the chosen threshold, one row per weight
    assert list(result["shape"]["shape_weight"]) == [0, 1, 2, 4]


def test_an_unknown_objective_is_refused_with_the_param():
    cases, nodules = _dice_or_cpm_case()
    with pytest.raises(ValueError, match=r"postprocess\.objective .*'cpm'"):
        choose.choose(cases, nodules, {**GRIDS, "objective": "cpm", "min_candidate_mm3": 0.0})
