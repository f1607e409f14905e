"""The candidate classifier (:mod:`ctpipe.classifier`, stages candidates and classify): crops cut
at any point, even outside the volume; a network trained on balls and rods ranks a faint nodule
above a bright vessel-like false positive; the weight of its score chosen on val."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ctpipe import classifier, config
from ctpipe.geometry import Geometry, array_index_to_world
from stages import classify as stage

SHAPE = (12, 12, 12)
SPACING = (1.0, 1.0, 1.0)


def test_crop_shape_is_the_side_in_voxels_rounded_up_to_a_multiple_of_4():
    assert classifier.crop_shape((0.7, 0.7, 1.25), 32) == (28, 48, 48)  # k from z, j, i
    assert classifier.crop_shape((1.78, 1.78, 2.5), 32) == (16, 20, 20)
    assert classifier.crop_shape((10.0, 10.0, 10.0), 32) == (8, 8, 8)  # at least 8


def test_crops_are_centred_and_a_point_outside_gets_air_not_an_error():
    geom = Geometry(origin=[-10.0, 5.0, 2.0], spacing=[0.5, 0.5, 2.0])
    image = np.random.default_rng(0).normal(size=(20, 30, 40)).astype(np.float16)
    kji = np.array([[10, 15, 20], [0, 0, 0], [5000, -9000, 3]], dtype=np.float64)
    xyz = array_index_to_world(kji, geom).reshape(-1, 3)
    xyz = np.r_[xyz, [[np.nan, 0.0, 0.0]]]  # a damaged centre
    crops = classifier.cut_crops(image, geom, xyz, (4, 6, 8), margin=1)
    assert crops.shape == (4, 6, 8, 10) and crops.dtype == np.float16
    np.testing.assert_array_equal(crops[0], image[7:13, 11:19, 15:25])
    assert crops[1, 3, 4, 5] == image[0, 0, 0] and crops[1, 0, 0, 0] == image.min()  # padded
    assert (crops[2] == image.min()).all() and (crops[3] == image.min()).all()


def test_combine_runs_from_the_segmentation_to_the_classifier():
    seg, prob = np.array([0.9, 0.2]), np.array([0.1, 0.8])
    np.testing.assert_allclose(classifier.combine(seg, prob, 0.0), seg)
    np.testing.assert_allclose(classifier.combine(seg, prob, 1.0), prob)
    np.testing.assert_allclose(classifier.combine(seg, prob, 0.5), np.sqrt(seg * prob))


def ball(shape=SHAPE, radius=3.0, contrast=1.0, rng=None) -> np.ndarray:
    kk, jj, ii = np.indices(shape) - np.array(shape)[:, None, None, None] // 2
    out = np.where(kk**2 + jj**2 + ii**2 <= radius**2, contrast, -1.0)
    return out + (0 if rng is None else 0.2 * rng.normal(size=shape))


def rod(shape=SHAPE, radius=1.5, axis=0, rng=None) -> np.ndarray:
    kk, jj, ii = np.indices(shape) - np.array(shape)[:, None, None, None] // 2
    across = [(jj, ii), (kk, ii), (kk, jj)][axis]
    out = np.where(across[0] ** 2 + across[1] ** 2 <= radius**2, 1.0, -1.0)
    return out + (0 if rng is None else 0.2 * rng.normal(size=shape))


def crops_and_table(n: int, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """``n`` nodule crops (balls of any size and contrast) and ``n`` vessel crops (rods along any
    axis), with the margin the training shifts need."""
    grown = tuple(s + 2 * classifier.MARGIN for s in SHAPE)
    balls = [ball(grown, rng.uniform(1.5, 4), rng.uniform(0.0, 1.0), rng) for _ in range(n)]
    rods = [rod(grown, rng.uniform(1, 2), int(rng.integers(3)), rng) for _ in range(n)]
    table = pd.DataFrame({"label": [1] * n + [0] * n, "source": "candidate"})
    return table, np.stack(balls + rods).astype(np.float16)


def test_the_classifier_ranks_a_faint_nodule_above_a_bright_vessel(tmp_path):
    rng = np.random.default_rng(0)
    cfg = config.Classify(
        channels=[8, 16, 32],
        epochs=12,
        samples_per_epoch=512,
        batch_size=32,
        lr=0.003,
        positive_fraction=0.5,
        weight_grid=[0.0, 0.5, 1.0],
        gain_confidence=0.95,
    )
    live = stage.Live(str(tmp_path / "live"), dvcyaml=False, save_dvc_exp=False)
    net, record = stage.train(
        cfg, crops_and_table(64, rng), crops_and_table(16, rng), SHAPE, 0, live
    )
    assert record["val_auc"] > 0.95

    # One volume: a bright rod the segmentation is sure of, and a faint ball it barely saw.
    image = np.full((40, 40, 40), -1.0)
    image[:, 3:15, 3:15] = rod((40, 12, 12), 1.5, axis=0)  # a vessel along k
    image[23:35, 23:35, 23:35] = ball(SHAPE, 3.0, 0.3)
    geom = Geometry(origin=[0.0, 0.0, 0.0], spacing=list(SPACING))
    centres = array_index_to_world(np.array([[20.0, 9.0, 9.0], [29.0, 29.0, 29.0]]), geom)
    cands = pd.DataFrame(centres.reshape(-1, 3), columns=["coordX", "coordY", "coordZ"])
    cands["score"] = [0.99, 0.4]  # the segmentation's: the vessel first
    model = classifier.CandidateClassifier(net, SHAPE, 12.0, weight=0.75)
    rescored = model.rescore(image.astype(np.float16), geom, cands)
    assert list(rescored["seg_score"]) == [0.4, 0.99]  # now the nodule ranks first
    assert rescored["classifier"].iloc[0] > 0.9 and rescored["classifier"].iloc[1] < 0.5

    saved = tmp_path / "classifier.pt"
    model.save(saved, cfg.channels, stage.model_record(record))
    again = classifier.CandidateClassifier.load(saved).rescore(
        image.astype(np.float16), geom, cands
    )
    pd.testing.assert_frame_equal(again, rescored)
    # The same model saved after a slower run of the same training: the same bytes.
    slower = {**record, "seconds": record["seconds"] * 2, "samples_per_s": 1.0}
    (tmp_path / "again").mkdir()  # the same file name: torch.save writes it into the archive
    model.save(tmp_path / "again" / saved.name, cfg.channels, stage.model_record(slower))
    assert (tmp_path / "again" / saved.name).read_bytes() == saved.read_bytes()
    assert record["seconds"] > 0 and "seconds" not in torch.load(saved, weights_only=True)["record"]


def val_candidates(scans: str, gains: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One nodule and 8 false candidates per scan. Where ``gains`` says ``+`` the segmentation
    ranks the nodule last and the classifier first; where ``-``, the other way round."""
    nodules = pd.DataFrame({"seriesuid": list(scans), "coordX": 0.0, "coordY": 0.0, "coordZ": 0.0})
    far = {"coordX": 100.0, "coordY": 100.0, "coordZ": 100.0}
    rows = []
    for scan, gain in zip(scans, gains):
        hit = {"coordX": 0.0, "coordY": 0.0, "coordZ": 0.0}
        seg, p = (0.5, 0.99) if gain == "+" else (0.95, 0.01)
        rows.append({"seriesuid": scan, **hit, "seg": seg, "p": p})
        rows += [{"seriesuid": scan, **far, "seg": 0.9, "p": 0.1} for _ in range(8)]
    cands = pd.DataFrame(rows).rename(columns={"seg": "seg_score", "p": "classifier"})
    return cands, nodules.assign(diameter_mm=10.0)


def test_a_weight_is_taken_when_it_beats_the_segmentation_beyond_the_noise():
    cands, nodules = val_candidates("abcdef", "++++++")
    table, weight = classifier.choose_weight(cands, nodules, list("abcdef"), [0.0, 0.5, 1.0], 0.95)
    cpm = table.set_index("weight")["cpm"]
    assert cpm[0.0] < cpm[0.5] == cpm[1.0] == 1.0
    assert weight == 0.5  # the smaller weight on ties
    assert table.set_index("weight")["resamples_won"][0.5] == 1.0


def test_a_gain_within_the_noise_of_the_val_split_is_not_taken():
    cands, nodules = val_candidates("abcdef", "++++--")  # better on 4 scans, worse on 2
    table, weight = classifier.choose_weight(cands, nodules, list("abcdef"), [0.0, 1.0], 0.95)
    cpm = table.set_index("weight")["cpm"]
    assert cpm[1.0] > cpm[0.0]  # higher on val as a whole
    assert table.set_index("weight")["resamples_won"][1.0] < 0.95 and weight == 0.0
    _, weight = classifier.choose_weight(cands, nodules, list("abcdef"), [0.0, 1.0], 0.5)
    assert weight == 1.0  # a looser rule takes it
    _, weight = classifier.choose_weight(cands, nodules.iloc[:0], list("abcdef"), [0.0, 1.0], 0.5)
    assert weight == 0.0  # no val nodule: the segmentation alone
