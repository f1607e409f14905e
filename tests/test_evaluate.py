"""The evaluate stage on the tiny dataset: test cases only, under the chosen post-processing."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ctpipe.model import data, infer
from ctpipe.volumes import case_files, open_volume, write_volume
from stages import evaluate as stage

REAL_LOAD_CASE = data.load_case


def confident(image: np.ndarray) -> np.ndarray:
    """A network sure of every nodule voxel (the tiny cohort's nodules are the bright ones)."""
    return np.where(image > 0.25, 0.95, 0.05)


def run_stage(
    root: Path, processed: Path, chosen: dict, monkeypatch, model_fn=confident, extra=()
) -> tuple[dict, list[str]]:
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["inference"].update(roi_size=32, views=["axial"], mirror_axes=[], min_candidate_mm3=0)
    params["evaluate"]["bootstrap"] = 20
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "postprocessing.json").write_text(json.dumps({"chosen": chosen}))
    read = []

    def recording_load(processed, case_id):
        read.append(case_id)
        return REAL_LOAD_CASE(processed, case_id)

    monkeypatch.setattr(data, "load_case", recording_load)
    monkeypatch.setattr(infer, "predict_volume", lambda predictor, image, *a, **k: model_fn(image))
    argv = [
        str(root / "model.pt"),
        str(processed),
        str(root / "plots"),
        "--onnx",
        str(root / "model.onnx"),
        "--postprocessing",
        str(root / "postprocessing.json"),
        "--params",
        str(root / "params.yaml"),
        "--metrics",
        str(root / "evaluate.json"),
        *extra,
    ]
    assert stage.main(argv) == 0
    return json.loads((root / "evaluate.json").read_text()), read


def test_evaluate_scores_the_test_split_with_the_chosen_post_processing(
    tmp_path, tiny_models, monkeypatch
):
    processed = tiny_models.make_processed(tmp_path / "processed")
    tiny_models.make_checkpoint(tmp_path / "model.pt")
    tiny_models.make_onnx(tmp_path / "model.onnx")
    chosen = {"threshold": 0.5, "component_threshold": 0.9, "shape_weight": 2.0}
    metrics, read = run_stage(tmp_path, processed, chosen, monkeypatch)
    test, nodules = data.split_cases(processed, "test")
    assert read == [c["case_id"] for c in test]  # the test split only
    assert metrics["test_cases"] == len(test) and metrics["test_nodules"] == len(nodules) > 0
    assert metrics["dice"] == pytest.approx(1.0, abs=0.01)
    assert metrics["sensitivity"] == 1.0 and metrics["fp_per_scan"] == 0.0
    lo, hi = metrics["froc_cpm_ci95"]
    assert lo <= metrics["froc_cpm"] <= hi
    per_case = pd.read_csv(tmp_path / "plots" / "per_case.csv")
    assert list(per_case["case_id"]) == [c["case_id"] for c in test]
    assert (tmp_path / "plots" / "overlays" / "best.png").is_file()
    # Subgroups: the tiny dataset's index has no sex, age or scanner and its nodules.csv no kinds,
    # so only the split and the size bands remain; nothing does worse than the split.
    groups = pd.read_csv(tmp_path / "plots" / "subgroups.csv")
    assert groups["subgroup"].iloc[0] == "all" and set(groups["attribute"]) == {"all", "size"}
    assert groups["sensitivity"].eq(1.0).all() and not groups["flagged"].any()
    assert metrics["sensitivity_by_type"] == {} and metrics["subgroups_flagged"] == 0
    lo, hi = metrics["sensitivity_ci95"]
    assert lo <= metrics["sensitivity"] <= hi


def test_a_classifier_ranks_the_candidates_and_leaves_the_mask_alone(
    tmp_path, tiny_models, monkeypatch
):
    import torch

    from ctpipe import classifier

    processed = tiny_models.make_processed(tmp_path / "processed")
    tiny_models.make_checkpoint(tmp_path / "model.pt")
    tiny_models.make_onnx(tmp_path / "model.onnx")
    chosen = {"threshold": 0.5, "component_threshold": 0.9, "shape_weight": 2.0}
    before, _ = run_stage(tmp_path, processed, chosen, monkeypatch)
    before_cands = pd.read_csv(tmp_path / "plots" / "candidates.csv")
    torch.manual_seed(0)
    shape = (8, 8, 8)
    model = classifier.CandidateClassifier(classifier.make_net(shape, [4, 8]), shape, 8.0, 0.5)
    model.save(tmp_path / "classifier.pt", [4, 8], {})
    extra = ("--classifier", str(tmp_path / "classifier.pt"))
    after, _ = run_stage(tmp_path, processed, chosen, monkeypatch, extra=extra)
    cands = pd.read_csv(tmp_path / "plots" / "candidates.csv")
    assert after["classifier"] and not before["classifier"]
    assert after["froc_cpm_segmentation"] == before["froc_cpm"] == before["froc_cpm_segmentation"]
    for key in ("dice", "sensitivity", "fp_per_scan"):  # the operating point is unchanged
        assert after[key] == before[key], key
    assert sorted(cands["seg_score"]) == sorted(before_cands["score"])
    assert cands["classifier"].between(0, 1).all()
    expected = classifier.combine(cands["seg_score"], cands["classifier"], 0.5)
    np.testing.assert_allclose(cands["score"], expected)


def test_evaluate_refuses_a_post_processing_with_the_deleted_rule_on(
    tmp_path, tiny_models, monkeypatch
):
    processed = tiny_models.make_processed(tmp_path / "processed")
    tiny_models.make_checkpoint(tmp_path / "model.pt")
    tiny_models.make_onnx(tmp_path / "model.onnx")
    chosen = {"threshold": 0.5, "component_threshold": 0.9, "shape_weight": 0, "keep_level": 0.3}
    with pytest.raises(ValueError, match=r"postprocessing.json: 'chosen': \{'keep_level': 0.3\}"):
        run_stage(tmp_path, processed, chosen, monkeypatch)


def test_evaluate_predicts_each_test_case_with_no_other_in_memory(
    tmp_path, tiny_models, monkeypatch
):
    """Every case of the tiny dataset taken as test: when each is predicted, the images and
    probability maps of the earlier ones are gone (the overlays keep 2D slices, not volumes)."""
    processed = tiny_models.make_processed(tmp_path / "processed")
    tiny_models.make_checkpoint(tmp_path / "model.pt")
    tiny_models.make_onnx(tmp_path / "model.onnx")
    every = data.load_index(processed)["cases"]
    nodules = data.load_nodules(processed)
    monkeypatch.setattr(data, "split_cases", lambda processed, split: (every, nodules))
    made, alive = [], []

    def tracked(image):
        alive.append(sum(ref() is not None for ref in made))
        prob = confident(image)
        made.extend([weakref.ref(image), weakref.ref(prob)])
        return prob

    chosen = {"threshold": 0.5, "component_threshold": 0.9, "shape_weight": 2.0}
    metrics, read = run_stage(tmp_path, processed, chosen, monkeypatch, model_fn=tracked)
    assert len(read) == len(every) > 2 and alive == [0] * len(every)
    assert metrics["test_cases"] == len(every)


def test_evaluate_reports_null_voxel_metrics_when_no_test_case_has_a_nodule(
    tmp_path, tiny_models, monkeypatch
):
    """A test split without nodule voxels (a small cohort whose few small nodules vanished at the
    plan's spacing) leaves Dice undefined: the stage says so and writes null, it does not crash."""
    processed = tiny_models.make_processed(tmp_path / "processed")
    test, _ = data.split_cases(processed, "test")
    for case in test:  # the test cases lose their nodules: empty masks, no annotation rows
        label = case_files(processed, case["case_id"])[1]
        write_volume(label, np.zeros_like(open_volume(label)[:]))
    table = pd.read_csv(processed / "nodules.csv")
    table[~table["seriesuid"].isin([c["seriesuid"] for c in test])].to_csv(
        processed / "nodules.csv", index=False
    )
    tiny_models.make_checkpoint(tmp_path / "model.pt")
    tiny_models.make_onnx(tmp_path / "model.onnx")
    chosen = {"threshold": 0.5, "component_threshold": 0.9, "shape_weight": 2.0}
    metrics, _ = run_stage(tmp_path, processed, chosen, monkeypatch)
    assert metrics["test_nodules"] == 0
    assert metrics["dice"] is None and metrics["iou"] is None and metrics["hd95_mm"] is None
