"""Malignancy: the synthetic readers' ratings, the image figures, the model, its AUC and the stage."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from ctpipe import annotations, malignancy, synth, synth_ratings
from ctpipe.fileio import write_json
from ctpipe.geometry import Geometry, array_index_to_world
from ctpipe.volumes import case_files, write_volume
from stages import malignancy as stage

NORM = {"kind": "window", "clip": [-1000.0, 400.0], "mean": 0.0, "std": 100.0}
SPACING = (1.0, 1.0, 1.0)


def hu_volume(shape=(40, 40, 40)) -> np.ndarray:
    return np.full(shape, -850.0)  # aerated lung


def ball(vol: np.ndarray, centre, radius: float, hu: float) -> None:
    kk, jj, ii = np.indices(vol.shape)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip((kk, jj, ii), centre)))
    vol[dist <= radius] = hu


def figures(vol: np.ndarray, centre, diameter: float) -> dict:
    geom = Geometry(origin=[0.0, 0.0, 0.0], spacing=SPACING)
    xyz = array_index_to_world(np.array([centre], dtype=np.float64), geom)
    norm = ((np.clip(vol, -1000, 400) - NORM["mean"]) / NORM["std"]).astype(np.float16)
    nodule = pd.DataFrame(xyz, columns=["coordX", "coordY", "coordZ"]).assign(diameter_mm=diameter)
    return malignancy.features(norm, geom, nodule, NORM).iloc[0].to_dict()


def test_ratings_are_one_to_five_per_reader_and_the_same_for_the_same_patient(tmp_path):
    cohort = synth.Cohort(n_patients=1, matrix=48, z_extent_mm=60, max_nodules=3)
    rows = synth.write_case(tmp_path / "a", 5, 0, cohort.but(fraction_without_nodules=0.0))
    again = synth.write_case(tmp_path / "b", 5, 0, cohort.but(fraction_without_nodules=0.0))
    ratings = pd.DataFrame(rows)[annotations.RATINGS]
    assert len(ratings) >= 1 and ratings.isin(range(1, 6)).all().all()
    assert ratings.equals(pd.DataFrame(again)[annotations.RATINGS])
    # the ratings draw from a stream of their own: the image's stream gives the same nodules
    case = synth.make_case(5, 0, cohort.but(fraction_without_nodules=0.0))
    assert [r["diameter_mm"] for r in rows] == [n.diameter_mm for n in case.nodules]


def test_the_latent_model_leaves_room_beyond_the_diameter_as_documented():
    # the default cohort's nodule mix, many nodules: the calibration of docs/data.md
    rng = np.random.default_rng(0)
    n = 20000
    cohort = synth.Cohort()
    d = np.exp(rng.uniform(*np.log(cohort.diameter_mm), n))
    u = rng.random((3, n))
    kind = np.where(u[0] < cohort.perifissural_fraction, "perifissural", "isolated")
    texture = np.select(
        [u[1] < cohort.part_solid_fraction, u[1] < 0.3], ["part_solid", "ground_glass"], "solid"
    )
    margin = np.select(
        [u[2] < cohort.lobulated_fraction, u[2] < 0.25], ["lobulated", "spiculated"], "smooth"
    )
    model = synth_ratings.RatingModel()
    z = model.suspicion(d, kind, texture, margin)
    ratings = pd.DataFrame(model.rate(z, rng), columns=annotations.RATINGS)
    y = malignancy.label(ratings).astype(int)
    assert 0.25 < y.mean() < 0.45
    by_diameter, by_features = roc_auc_score(y, d), roc_auc_score(y, z)
    assert 0.85 < by_diameter < 0.93
    assert by_features > by_diameter + 0.03


@pytest.mark.parametrize("value", ["0", "6", "2.5", "x", "=1+1", "-3"])
def test_a_rating_that_is_not_1_to_5_is_refused_naming_column_and_row(value):
    frame = pd.DataFrame(
        {
            "seriesuid": ["1.2", "1.3"],
            "coordX": [0, 1],
            "coordY": [0, 1],
            "coordZ": [0, 1],
            "diameter_mm": [5, 6],
            "malignancy_2": ["3", value],
        }
    )
    with pytest.raises(ValueError, match=r"a.csv: column 'malignancy_2', row 3"):
        annotations.select(frame, "a.csv")


def test_ratings_may_be_missing_and_the_label_is_the_mean_above_3():
    frame = pd.DataFrame(
        {
            "seriesuid": ["1", "2", "3"],
            "coordX": [0, 0, 0],
            "coordY": [0, 0, 0],
            "coordZ": [0, 0, 0],
            "diameter_mm": [5, 5, 5],
            "malignancy_1": [4, None, 3],
            "malignancy_3": [3, None, 3],
        }
    )
    kept = annotations.select(frame, "a.csv")
    assert list(kept.columns[-2:]) == ["malignancy_1", "malignancy_3"]
    label = malignancy.label(kept.reindex(columns=annotations.RATINGS))
    assert label.tolist() == [1, pd.NA, 0]


def test_figures_tell_solid_from_ground_glass_and_a_spiculated_margin_from_a_smooth_one():
    solid, glass, spiky = hu_volume(), hu_volume(), hu_volume()
    ball(solid, (20, 20, 20), 5, 40.0)
    ball(glass, (20, 20, 20), 5, -550.0)
    ball(spiky, (20, 20, 20), 5, 40.0)
    for axis in range(3):  # strands out of the surface along every axis
        line = [slice(20, 21)] * 3
        line[axis] = slice(8, 33)
        spiky[tuple(line)] = 0.0
    f_solid, f_glass, f_spiky = (figures(v, (20, 20, 20), 10.0) for v in (solid, glass, spiky))
    assert f_solid["solid_share"] > 0.9 and f_glass["solid_share"] < 0.05
    assert f_spiky["margin_share"] > 0.005 > f_solid["margin_share"]  # thin strands: a few voxels
    assert f_solid["log_diameter"] == pytest.approx(np.log(10.0))


def test_figures_of_a_nodule_at_the_edge_or_outside_are_read_not_an_error(monkeypatch):
    vol = hu_volume((10, 10, 10))
    edge = figures(vol, (0, 0, 0), 30.0)
    outside = figures(vol, (500, -500, 9), 4.0)
    assert 0.0 <= edge["solid_share"] <= 1.0 and outside["solid_share"] == 0.0
    # a component wider than any nodule (a leaking segmentation) is read within a bounded reach:
    # unbounded, this crop (603 voxels a side) and its grids would take over 8 GB
    shapes = []
    cut = malignancy.cut_crops
    monkeypatch.setattr(malignancy, "cut_crops", lambda *a: shapes.append(a[3]) or cut(*a))
    huge = figures(vol, (5, 5, 5), 400.0)
    assert huge["log_diameter"] == pytest.approx(np.log(400.0)) and huge["margin_share"] == 0.0
    assert max(shapes[0]) == 2 * (malignancy.REACH_MM + 1) + 1  # 1 mm voxels


def test_the_model_travels_as_json_and_refuses_other_figures(tmp_path):
    model = malignancy.MalignancyModel(
        features=malignancy.FEATURES,
        mean=(2.0, 0.5, 0.1),
        scale=(0.5, 0.3, 0.1),
        coef=(2.0, 0.0, 0.0),
        intercept=-1.0,
    )
    model.save(tmp_path / "m.json")
    again = malignancy.MalignancyModel.load(tmp_path / "m.json")
    table = pd.DataFrame({"log_diameter": [1.0, 3.0], "solid_share": 0, "margin_share": 0})
    assert np.allclose(again.probability(table), model.probability(table))
    assert model.probability(table)[1] > 0.9 > 0.1 > model.probability(table)[0]
    values = json.loads((tmp_path / "m.json").read_text())
    write_json(tmp_path / "bad.json", {**values, "features": ["log_diameter"]})
    with pytest.raises(ValueError, match="bad.json: features"):
        malignancy.MalignancyModel.load(tmp_path / "bad.json")
    write_json(tmp_path / "none.json", {"model": None, "reason": "no ratings"})
    assert malignancy.load_optional(tmp_path / "none.json") is None


def test_auc_intervals_resample_scans_and_pair_the_scores():
    truth = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    perfect = truth + 0.1 * np.arange(8) / 8
    noisy = np.array([0.2, 0.6, 0.5, 0.9, 0.1, 0.3, 0.7, 0.8])
    scans = ["a", "a", "b", "b", "c", "c", "d", "d"]
    auc = malignancy.auc_with_interval(truth, {"p": perfect, "n": noisy}, scans, 200, 0)
    assert auc["p"]["auc"] == 1.0 and auc["p"]["lo"] == 1.0
    assert auc["n"]["lo"] <= auc["n"]["auc"] <= auc["n"]["hi"]
    assert auc["diff_n"]["auc"] == pytest.approx(1.0 - auc["n"]["auc"])
    assert auc["diff_n"]["share_above"] > 0.5
    one_class = malignancy.auc_with_interval(np.zeros(4), {"p": np.arange(4)}, "abcd", 10, 0)
    assert one_class["p"]["auc"] is None


def write_rated_cohort(root, per_split: int = 6, by: str = "size"):
    """A processed cohort of single balls and its candidate tables: the malignant ones big
    (``by`` size) or solid among ground-glass ones of the same size (``by`` texture)."""
    rng = np.random.default_rng(1)
    shape, entries, nodules, tables = (24, 40, 40), [], [], {"train": [], "val": []}
    (root / "processed" / "cases").mkdir(parents=True)
    geom = Geometry(origin=[0.0, 0.0, 0.0], spacing=SPACING)
    for n in range(2 * per_split):
        split = "train" if n < per_split else "val"
        case_id, uid, big = f"case_{n:03d}", f"1.2.3.{n}", n % 2 == 1
        vol = hu_volume(shape) + rng.normal(0, 20, shape)
        radius = (6.0 if big else 2.5) if by == "size" else 5.0
        ball(vol, (12, 20, 20), radius, 30.0 if big or by == "size" else -550.0)
        image_file, label_file = case_files(root / "processed", case_id)
        write_volume(image_file, ((np.clip(vol, -1000, 400) - 0) / 100).astype(np.float16))
        write_volume(label_file, np.zeros(shape, np.uint8))
        entries.append(
            {"case_id": case_id, "seriesuid": uid, "split": split, "patient_id": f"p{n}"}
            | {"shape": list(shape), "geometry": geom.to_dict(), "nodules": 1}
        )
        x, y, z = array_index_to_world(np.array([[12.0, 20.0, 20.0]]), geom)[0]
        rating = [4, 5, 4, 4] if big else [2, 1, 2, 3]
        nodules.append(
            {"seriesuid": uid, "coordX": x, "coordY": y, "coordZ": z, "diameter_mm": 2 * radius}
            | dict(zip(annotations.RATINGS, rating))
        )
        index = sum(e["split"] == split for e in entries) - 1
        tables[split].append(
            {"seriesuid": uid, "case_id": case_id, "coordX": x, "coordY": y, "coordZ": z}
            | {"seg_score": 0.9, "diameter_mm": 2 * radius, "nodule_index": index}
            | {"label": 1, "source": "candidate"}
        )
    write_json(root / "processed" / "index.json", {"cases": entries})
    write_json(root / "processed" / "plan.json", {"normalization": NORM})
    pd.DataFrame(nodules).to_csv(root / "processed" / "nodules.csv", index=False)
    (root / "candidates").mkdir()
    for split, rows in tables.items():
        pd.DataFrame(rows).to_csv(root / "candidates" / f"{split}.csv", index=False)
    return root


def test_stage_fits_a_model_that_ranks_big_balls_first(tmp_path, params_file):
    root = write_rated_cohort(tmp_path)
    out = tmp_path / "models" / "malignancy.json"
    metrics = tmp_path / "metrics" / "malignancy.json"
    argv = [str(root / "candidates"), str(root / "processed"), str(out)]
    argv += ["--tables", str(tmp_path / "tables"), "--params", str(params_file)]
    assert stage.main([*argv, "--metrics", str(metrics)]) == 0
    figures_ = json.loads(metrics.read_text())
    assert figures_["train_used"] == 6 and figures_["val_used"] == 6
    assert figures_["val_auc"] == 1.0 and figures_["coef"]["log_diameter"] > 0
    # every figure ranks the val balls as well as the diameter alone: no gain, the diameter's model
    assert not figures_["uses_image_figures"] and figures_["coef"]["solid_share"] == 0
    val = pd.read_csv(tmp_path / "tables" / "val.csv")
    assert (val.loc[val["label"] == 1, "probability"] > 0.5).all()
    assert (val.loc[val["label"] == 0, "probability"] < 0.5).all()
    malignancy.MalignancyModel.load(out)


def test_stage_without_ratings_writes_why_there_is_no_model(tmp_path, params_file):
    root = write_rated_cohort(tmp_path)
    nodules = pd.read_csv(root / "processed" / "nodules.csv")
    nodules.drop(columns=annotations.RATINGS).to_csv(root / "processed" / "nodules.csv")
    out = tmp_path / "malignancy.json"
    argv = [str(root / "candidates"), str(root / "processed"), str(out), "--params"]
    argv += [str(params_file), "--tables", str(tmp_path / "t")]
    assert stage.main([*argv, "--metrics", str(tmp_path / "m.json")]) == 0
    assert malignancy.load_optional(out) is None
    assert "no malignancy ratings" in json.loads(out.read_text())["reason"]
    assert pd.read_csv(tmp_path / "t" / "val.csv").empty  # DVC's output exists


def test_stage_takes_the_image_figures_when_they_beat_the_diameter(tmp_path, params_file):
    root = write_rated_cohort(tmp_path, by="texture")  # one size: the diameter cannot tell
    metrics = tmp_path / "m.json"
    argv = [str(root / "candidates"), str(root / "processed"), str(tmp_path / "model.json")]
    argv += ["--tables", str(tmp_path / "t"), "--params", str(params_file)]
    assert stage.main([*argv, "--metrics", str(metrics)]) == 0
    figures_ = json.loads(metrics.read_text())
    assert figures_["uses_image_figures"] and figures_["val_gain_share"] >= 0.95
    assert figures_["val_auc"] == 1.0 and figures_["val_auc_diameter"] == 0.5
    assert figures_["coef"]["solid_share"] > 0


def test_stage_with_one_label_only_writes_why_there_is_no_model(tmp_path, params_file):
    root = write_rated_cohort(tmp_path)
    nodules = pd.read_csv(root / "processed" / "nodules.csv")
    nodules[annotations.RATINGS] = 1  # every reader: highly unlikely
    nodules.to_csv(root / "processed" / "nodules.csv", index=False)
    out = tmp_path / "malignancy.json"
    argv = [str(root / "candidates"), str(root / "processed"), str(out), "--params"]
    argv += [str(params_file), "--tables", str(tmp_path / "t")]
    assert stage.main([*argv, "--metrics", str(tmp_path / "m.json")]) == 0
    assert (
        "train split's found rated nodules are all one label"
        in json.loads(out.read_text())["reason"]
    )
