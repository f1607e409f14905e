"""Post-processing chosen on validation: the sweeps by hand, and the stage on two models."""

from __future__ import annotations

import json
import tracemalloc
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import ndimage

from ctpipe import config
from ctpipe.deploy.predict import package_post_processing
from ctpipe.geometry import Geometry, array_index_to_world
from ctpipe.model import data, infer
from ctpipe.postprocessing import choose
from ctpipe.postprocessing.candidates import Chosen, candidates_from_probability, find_nodules
from stages import postprocess as stage

GRIDS = {
    "threshold": "auto",
    "threshold_grid": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
    "component_threshold": "auto",
    "component_threshold_grid": [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99],
    "shape_weight": "auto",
    "shape_weight_grid": [0, 1, 2, 4],
}


def postprocess_params(**changes) -> config.Postprocess:
    """The ``postprocess`` section with ``GRIDS`` and ``changes``, checked as params.yaml is."""
    return config.Postprocess.model_validate({**GRIDS, **changes})


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
    table = choose.sweep_masks(choose.tabulate(cases, [0.3, 0.5], [0.5, 0.9], 0.0), nodules)
    row = table.set_index(["threshold", "component_threshold"])
    # Plain 0.5: only the centre voxel and the false blob -> 2 / (9 + 27).
    assert row.loc[(0.5, 0.5), "dice"] == pytest.approx(2 * 1 / (9 + 27))
    # 0.3 with components peaking >= 0.9: the whole nodule, no false blob.
    assert row.loc[(0.3, 0.9), "dice"] == pytest.approx(1.0)
    assert row.loc[(0.3, 0.9), "fp_per_scan"] == 0 and row.loc[(0.3, 0.9), "sensitivity"] == 1
    # The nodule-free case's blob counts in the pooled Dice and the false positives.
    assert row.loc[(0.3, 0.5), "dice_pooled"] == pytest.approx(2 * 27 / (27 + 8 + 8 + 27))
    assert row.loc[(0.3, 0.5), "fp_per_scan"] == pytest.approx(1.0)
    params = postprocess_params(threshold_grid=[0.3, 0.5], component_threshold_grid=[0.5, 0.9])
    chosen = choose.choose(cases, nodules, params, 0.0)["chosen"]
    assert (chosen.threshold, chosen.component_threshold) == (0.3, 0.9)


def test_best_breaks_ties_by_pooled_dice_then_false_positives_then_lower_values():
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
    best = choose.best(table, "dice")
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
    # Every weight keeps the same mask (the same Dice): the smallest weight of the best CPM wins.
    case = choose.Case(prob, prob > 0.985, geom, "a")
    params = postprocess_params(
        threshold=0.2, component_threshold=0.2, shape_weight_grid=[0, 1, 2, 8]
    )
    assert choose.choose([case], nodules, params, 0.0)["chosen"].shape_weight == 1


def test_grid_is_the_fixed_value_when_params_set_one():
    assert choose.grid(0.45, GRIDS["threshold_grid"]) == [0.45]
    assert choose.grid("auto", [4, 0, 2, 1, 2]) == [0, 1, 2, 4]


@pytest.mark.parametrize(
    "key, value, reason",
    [
        ("threshold_grid", [], r"postprocess\.threshold_grid: List should have at least 1 item"),
        (
            "threshold_grid",
            [0.3, 1.5],
            r"postprocess\.threshold_grid\.1: .*less than or equal to 1",
        ),
        ("component_threshold", 0, r"postprocess\.component_threshold: .*greater than 0"),
        (
            "shape_weight_grid",
            [0, -1],
            r"postprocess\.shape_weight_grid\.1: .*greater than or equal",
        ),
    ],
)
def test_params_refuse_grids_and_values_out_of_range_naming_the_key(key, value, reason):
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["postprocess"][key] = value
    with pytest.raises(config.ConfigError, match=reason):
        config.validate(raw)


def test_load_names_the_file_and_what_is_missing(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"chosen": {"threshold": 0.5}}))
    with pytest.raises(
        ValueError, match=r"p.json: 'chosen' lacks \['component_threshold', 'shape_weight'\]"
    ):
        choose.load(tmp_path / "p.json")


PAIR = {"threshold": 0.5, "component_threshold": 0.9, "shape_weight": 0}


def test_load_ignores_the_deleted_rule_when_off_and_refuses_it_when_on(tmp_path):
    """postprocessing.json written before the large-component rule was deleted: null is off."""
    off = {**PAIR, "keep_level": None, "keep_volume_mm3": None}
    (tmp_path / "off.json").write_text(json.dumps({"chosen": off, "objective": "dice+cpm"}))
    chosen = choose.load(tmp_path / "off.json")
    assert chosen == Chosen(0.5, 0.9, 0.0) and isinstance(chosen.shape_weight, float)
    (tmp_path / "on.json").write_text(json.dumps({"chosen": {**off, "keep_volume_mm3": 500}}))
    with pytest.raises(ValueError, match=r"on.json: 'chosen': \{'keep_volume_mm3': 500\} .*rule"):
        choose.load(tmp_path / "on.json")


@pytest.mark.parametrize(
    "key, value",
    [("threshold", 0), ("component_threshold", 1.5), ("shape_weight", -1), ("shape_weight", "2")],
)
def test_chosen_refuses_a_value_out_of_range_by_name(tmp_path, key, value):
    (tmp_path / "p.json").write_text(json.dumps({"chosen": {**PAIR, key: value}}))
    with pytest.raises(ValueError, match=rf"p.json: 'chosen': {key}: "):
        choose.load(tmp_path / "p.json")


def test_chosen_finds_the_nodules_of_its_values():
    geom = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 2.0))
    prob = np.zeros((10, 12, 12))
    prob[2:5, 2:5, 2:5], prob[3, 3, 3] = 0.6, 0.95
    prob[7:9, 8:10, 8:10] = 0.7  # never reaches the component threshold
    chosen = Chosen(0.5, 0.9, 2.0)
    mask, cands = chosen.find_nodules(prob, geom, 1.0)
    expected_mask, expected = find_nodules(prob, geom, 0.5, 0.9, 1.0, 2.0)
    assert mask.sum() == 27 and np.array_equal(mask, expected_mask)
    pd.testing.assert_frame_equal(cands, expected)


def test_predict_reads_a_package_with_the_rule_off_and_refuses_one_with_it_on(tmp_path):
    post = {
        "threshold": 0.4,
        "component_threshold": 0.9,
        "shape_weight": 2.0,
        "min_candidate_mm3": 4,
    }
    off = {"postprocessing": {**post, "keep_level": None, "keep_volume_mm3": None}}
    assert package_post_processing(off, tmp_path) == Chosen(0.4, 0.9, 2.0)
    old = {"postprocessing": {"threshold": 0.4, "min_candidate_mm3": 4}}  # before the pair
    assert package_post_processing(old, tmp_path) == Chosen(0.4, 0.4, 0.0)
    on = {"postprocessing": {**post, "keep_level": 0.3, "keep_volume_mm3": 500.0}}
    with pytest.raises(ValueError, match=r"input_spec.json: 'postprocessing': .*keep_level.*rule"):
        package_post_processing(on, tmp_path)


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
        "onnx": tiny_models.make_onnx(root / "model.onnx"),
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
                "--onnx",
                str(w["onnx"]),
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


def test_the_threshold_may_trade_dice_for_detection():
    """Dice + CPM: 0.5 keeps A's halo (lower Dice) but makes B a candidate; 0.7 would give A
    exactly (Dice 2 * 27 / (27 + 35)) and never see B (CPM 0.5)."""
    cases, nodules = _dice_or_cpm_case()
    params = postprocess_params(threshold_grid=[0.5, 0.7], component_threshold_grid=[0.9])
    result = choose.choose(cases, nodules, params, 0.0)
    assert result["chosen"].threshold == 0.5
    assert result["chosen"].shape_weight == 0.0  # every weight ties: the smallest
    assert result["val"]["dice"] == pytest.approx(2 * 27 / (36 + 35))
    assert result["val"]["cpm"] == pytest.approx(1.0)
    # the shape table of the chosen threshold, one row per weight
    assert list(result["shape"]["shape_weight"]) == [0, 1, 2, 4]
    rows = result["masks"].set_index("threshold")
    assert rows.loc[0.7, "dice"] == pytest.approx(2 * 27 / (27 + 35))


def _ball_case(n: int, made: list) -> choose.Case:
    """Validation case ``n`` (64^3): a ball nodule with an uncertain rim and a faint false blob;
    a weak reference to each of its volumes goes into ``made``."""
    geom = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    k, j, i = np.indices((64, 64, 64))
    ball = (k - 20) ** 2 + (j - 20 - n % 8) ** 2 + (i - 30) ** 2 <= 16
    prob = np.where(ball, 0.45, 0.02).astype(np.float32)
    prob[20, 20 + n % 8, 30] = 0.97
    prob[50:53, 50:53, 50:53] = 0.6
    made += [weakref.ref(prob), weakref.ref(ball)]
    return choose.Case(prob, ball, geom, f"s{n}")


def _ball_nodules(n_cases: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "seriesuid": [f"s{n}" for n in range(n_cases)],
            "coordX": [30.0] * n_cases,
            "coordY": [20.0 + n % 8 for n in range(n_cases)],
            "coordZ": [20.0] * n_cases,
            "diameter_mm": [8.0] * n_cases,
        }
    )


def _stream(n_cases: int, alive: list) -> Iterator[choose.Case]:
    """The cases one at a time, noting in ``alive`` how many earlier volumes are still in memory
    when each case is made (what a stage streaming predictions would hold)."""
    made = []
    for n in range(n_cases):
        alive.append(sum(ref() is not None for ref in made))
        yield _ball_case(n, made)


STREAM_GRIDS = {"threshold_grid": [0.3, 0.5], "component_threshold_grid": [0.5, 0.9]}


def test_the_choice_drops_each_case_before_the_next_is_made():
    alive = []
    params = postprocess_params(**STREAM_GRIDS, shape_weight_grid=[0, 1])
    result = choose.choose(_stream(6, alive), _ball_nodules(6), params, 0.0)
    assert alive == [0] * 6  # a list of the cases would hold 0, 2, 4, ... volumes
    assert result["val"]["cases"] == 6 and result["val"]["dice"] == pytest.approx(1.0)
    assert (result["chosen"].threshold, result["chosen"].component_threshold) == (0.3, 0.9)


def _peak_bytes(n_cases: int) -> int:
    params = postprocess_params(**STREAM_GRIDS, shape_weight_grid=[0, 1])
    tracemalloc.start()
    try:
        choose.choose(_stream(n_cases, []), _ball_nodules(n_cases), params, 0.0)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_choice_peak_memory_does_not_grow_with_the_number_of_cases():
    case_bytes = 64**3 * (4 + 1)  # one case's probability (float32) and truth (bool)
    # 3 more cases add their small tables, far less than one more case's volumes
    assert _peak_bytes(6) - _peak_bytes(3) < case_bytes


def test_the_stage_predicts_each_validation_case_with_no_other_in_memory(
    workspace, tmp_path, monkeypatch
):
    """Every case of the tiny dataset taken as validation: when each is predicted, the
    probability maps of the earlier ones are gone (the old stage kept them all in a list)."""
    every = data.load_index(workspace["processed"])["cases"]
    nodules = data.load_nodules(workspace["processed"])
    monkeypatch.setattr(data, "split_cases", lambda processed, split: (every, nodules))
    made, alive = [], []

    def tracked(image):
        alive.append(sum(ref() is not None for ref in made))
        prob = hesitant(image)
        made.append(weakref.ref(prob))
        return prob

    chosen, read = run_stage(workspace, tmp_path, tracked, monkeypatch)
    assert len(read) == len(every) > 2 and alive == [0] * len(every)
    assert chosen["val"]["cases"] == len(every)
