"""Candidates from probability maps and nodule masks from annotations, on an oblique grid."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from ctpipe.geometry import (
    Geometry,
    array_index_to_world,
    sphere_mask,
    world_grid,
    world_to_array_index,
)
from ctpipe.labels import nodule_mask
from ctpipe.postprocessing.candidates import (
    at_operating_point,
    candidates_from_probability,
    component_max,
    elongation,
    find_nodules,
    segment,
    shape_score,
)

SHAPE_KJI = (20, 40, 48)


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


@pytest.fixture
def geom() -> Geometry:
    """Oblique, anisotropic, off-origin: any axis swap or misplaced inverse shows."""
    direction = rotation(2, 30.0) @ rotation(0, 15.0)
    return Geometry(origin=(-120.5, 35.25, -310.0), spacing=(0.8, 1.1, 2.5), direction=direction)


def gaussian_blobs(geom: Geometry, centres: list[np.ndarray], peaks: list[float]) -> np.ndarray:
    """Isotropic (in mm) Gaussian bumps of sigma 3 mm at world centres, on the grid of ``geom``."""
    world = world_grid(SHAPE_KJI, geom)
    prob = np.zeros(SHAPE_KJI)
    for centre, peak in zip(centres, peaks):
        prob += peak * np.exp(-np.sum((world - centre) ** 2, axis=-1) / (2 * 3.0**2))
    return prob


def test_candidates_come_back_at_the_blob_centres(geom):
    # Centres between voxel centres, far apart, given in world mm.
    c1 = array_index_to_world(np.array([6.3, 12.6, 15.2]), geom)
    c2 = array_index_to_world(np.array([13.5, 28.1, 33.7]), geom)
    prob = gaussian_blobs(geom, [c1, c2], [0.9, 0.7])
    cands = candidates_from_probability(prob, geom, threshold=0.3)
    assert list(cands.columns) == [
        "coordX",
        "coordY",
        "coordZ",
        "diameter_mm",
        "score",
        "peak",
        "elongation",
        "volume_mm3",
    ]
    assert len(cands) == 2
    xyz = cands[["coordX", "coordY", "coordZ"]].to_numpy()
    # Sorted by score: the 0.9 blob first. The weighted centroid of a sampled, truncated symmetric
    # bump lies well within a voxel of its centre (smallest spacing 0.8 mm).
    assert np.linalg.norm(xyz[0] - c1) < 0.8
    assert np.linalg.norm(xyz[1] - c2) < 0.8
    assert cands["score"].iloc[0] == pytest.approx(prob.max())
    assert 0.3 <= cands["score"].iloc[1] <= 0.7


def test_candidate_volume_diameter_and_centroid_of_a_box(geom):
    prob = np.zeros(SHAPE_KJI)
    prob[2:5, 3:7, 4:9] = 0.8  # 3 * 4 * 5 = 60 voxels of 0.8 * 1.1 * 2.5 = 2.2 mm3
    cands = candidates_from_probability(prob, geom, threshold=0.5)
    assert len(cands) == 1
    row = cands.iloc[0]
    assert row["volume_mm3"] == pytest.approx(132.0)
    assert row["diameter_mm"] == pytest.approx((6 * 132.0 / np.pi) ** (1 / 3))
    assert row["score"] == pytest.approx(0.8)
    centre = array_index_to_world(np.array([3.0, 4.5, 6.0]), geom)
    np.testing.assert_allclose(row[["coordX", "coordY", "coordZ"]].to_numpy(float), centre)


def test_candidate_centre_is_probability_weighted(geom):
    prob = np.zeros(SHAPE_KJI)
    prob[5, 5, 5], prob[5, 5, 6] = 0.9, 0.6  # centroid at i = (5 * 0.9 + 6 * 0.6) / 1.5 = 5.4
    cands = candidates_from_probability(prob, geom, threshold=0.5)
    centre = array_index_to_world(np.array([5.0, 5.0, 5.4]), geom)
    np.testing.assert_allclose(cands[["coordX", "coordY", "coordZ"]].to_numpy()[0], centre)
    assert cands["score"].iloc[0] == pytest.approx(0.9)


def test_corner_neighbours_join_and_small_components_drop(geom):
    prob = np.zeros(SHAPE_KJI)
    prob[10, 10, 10] = prob[11, 11, 11] = 0.6  # touch at a corner only: one component
    prob[2, 30, 40] = 0.9  # a single voxel
    cands = candidates_from_probability(prob, geom, threshold=0.5)
    assert sorted(cands["volume_mm3"] / geom.voxel_volume_mm3) == pytest.approx([1.0, 2.0])
    kept = candidates_from_probability(prob, geom, threshold=0.5, min_volume_mm3=3.0)
    assert len(kept) == 1 and kept["score"].iloc[0] == pytest.approx(0.6)


def test_segment_keeps_the_whole_extent_of_confident_components_only():
    prob = np.zeros(SHAPE_KJI)
    prob[5:8, 5:8, 5:8] = 0.4
    prob[6, 6, 6] = 0.9  # a confident nodule with an uncertain rim
    prob[15:17, 30:33, 30:33] = 0.6  # a component that never gets confident
    prob[1, 1, 1] = 0.45  # a lone faint voxel
    mask = segment(prob, threshold=0.3, component_threshold=0.8)
    assert mask[5:8, 5:8, 5:8].all()  # rim voxels of 0.4 belong to the kept nodule
    assert mask.sum() == 27
    plain = segment(prob, threshold=0.5)
    np.testing.assert_array_equal(plain, prob >= 0.5)
    # A component threshold at or below the voxel threshold is plain thresholding.
    np.testing.assert_array_equal(segment(prob, 0.3, 0.3), prob >= 0.3)
    # Corner neighbours are one component (26-connectivity): the faint corner voxel joins.
    prob[8, 8, 8] = 0.35
    assert segment(prob, 0.3, 0.8)[8, 8, 8]
    assert not segment(np.zeros((4, 4)), 0.3, 0.8).any()


@pytest.mark.parametrize("threshold, component_threshold", [(0.3, 0.8), (0.5, 0.5), (0.6, 0.2)])
def test_operating_score_counts_exactly_the_components_the_mask_keeps(
    geom, threshold, component_threshold
):
    prob = np.zeros(SHAPE_KJI)
    prob[5:8, 5:8, 5:8] = 0.4
    prob[6, 6, 6] = 0.9
    prob[15:17, 30:33, 30:33] = 0.6
    prob[1, 1, 1] = 0.45
    prob[18, 20:23, 40] = 0.79
    mask = segment(prob, threshold, component_threshold)
    cands = candidates_from_probability(prob, geom, threshold)
    detected = cands[at_operating_point(cands, threshold, component_threshold)]
    assert detected["volume_mm3"].sum() == pytest.approx(mask.sum() * geom.voxel_volume_mm3)
    assert len(detected) == ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]
    # The shape weight reorders the FROC ranking, not the components the mask keeps.
    weighted = candidates_from_probability(prob, geom, threshold, shape_weight=4.0)
    assert sorted(
        weighted[at_operating_point(weighted, threshold, component_threshold)]["volume_mm3"]
    ) == pytest.approx(sorted(detected["volume_mm3"]))


def test_elongation_of_rods_voxels_and_a_ball_by_hand():
    # A rod of L unit voxels: variance L**2 / 12 along it (centres (L**2 - 1) / 12 plus a voxel's
    # 1 / 12), 1 / 12 across it: elongation L.
    labels = np.zeros((9, 9, 9), dtype=np.int64)
    labels[4, 4, 1:8] = 1  # 7 voxels along i
    labels[0, 0, 0] = 2  # one voxel
    labels[2:8, 0, 8] = 3  # 6 voxels along k
    np.testing.assert_allclose(elongation(labels, 3, (1.0, 1.0, 1.0)), [7.0, 1.0, 6.0])
    # In mm: 4 voxels of 2 mm along k, 1 mm across -> 8 mm long, 1 mm wide. The rod along i stays
    # 7 mm long and 1 mm wide in j; its 2 mm depth in k is the middle axis.
    rods = labels[2:6].copy()
    rods[rods == 3] = 2  # labels 1..n, as ndimage.label numbers them
    np.testing.assert_allclose(elongation(rods, 2, (2.0, 1.0, 1.0)), [7.0, 8.0])
    lone = np.zeros((3, 3, 3), dtype=np.int64)
    lone[1, 1, 1] = 1
    np.testing.assert_allclose(elongation(lone, 1, (2.0, 1.0, 1.0)), [2.0])
    # A ball of radius 6 voxels: round within the staircase of its surface, whatever the grid.
    k, j, i = np.mgrid[:15, :15, :15] - 7
    ball = (k**2 + j**2 + i**2 <= 36).astype(np.int64)
    assert elongation(ball, 1, (1.0, 1.0, 1.0))[0] == pytest.approx(1.0, abs=1e-9)  # symmetric grid
    # The same rod along a diagonal of the grid (i = j): orientation does not matter.
    diag = np.zeros((1, 12, 12), dtype=np.int64)
    diag[0, np.arange(10), np.arange(10)] = 1
    assert 5.0 < elongation(diag, 1, (1.0, 1.0, 1.0))[0] < 15.0


def test_shape_score_divides_the_odds_by_the_elongation():
    assert shape_score(np.array([0.9]), np.array([3.0]), 2.0)[0] == pytest.approx(
        0.9 / (0.9 + 0.1 * 9)
    )  # 0.5
    assert shape_score(np.array([0.8]), np.array([1.0]), 5.0)[0] == pytest.approx(
        0.8
    )  # a ball keeps its peak
    peak = np.array([0.3, 0.97, 1.0])
    np.testing.assert_array_equal(shape_score(peak, np.array([5.0, 5.0, 5.0]), 0.0), peak)
    # Saturated peaks (exactly 1) are still ordered by shape, and stay below 1.
    sat = shape_score(np.array([1.0, 1.0]), np.array([1.2, 4.0]), 2.0)
    assert 1.0 > sat[0] > sat[1] > 0.99


def test_a_tube_ranks_below_a_ball_once_shape_counts():
    geom = Geometry(origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0))
    prob = np.zeros((20, 20, 30))
    k, j, i = np.mgrid[:20, :20, :30]
    prob[(k - 6) ** 2 + (j - 6) ** 2 + (i - 6) ** 2 <= 9] = 0.98  # ball, r = 3 voxels
    prob[14:16, 14:16, 2:28] = 0.99  # tube, 26 voxels long, 2 wide: a vessel, more confident
    peak_first = candidates_from_probability(prob, geom, 0.5)
    assert list(peak_first["peak"]) == [0.99, 0.98]
    shaped = candidates_from_probability(prob, geom, 0.5, shape_weight=2.0)
    assert list(shaped["peak"]) == [0.98, 0.99]
    assert shaped["elongation"].iloc[1] == pytest.approx(13.0)  # 26 / 2
    assert shaped["elongation"].iloc[0] < 1.2


def test_no_component_gives_an_empty_frame_with_columns(geom):
    cands = candidates_from_probability(np.zeros(SHAPE_KJI), geom, threshold=0.5)
    assert cands.empty and "score" in cands.columns


def nodules_at(geom: Geometry, rows: list[tuple[np.ndarray, float]]) -> pd.DataFrame:
    """Nodules at array indices (turned into world mm) with diameters in mm."""
    xyz = [array_index_to_world(np.asarray(kji, float), geom) for kji, _ in rows]
    return pd.DataFrame(
        {
            "seriesuid": "s",
            "coordX": [p[0] for p in xyz],
            "coordY": [p[1] for p in xyz],
            "coordZ": [p[2] for p in xyz],
            "diameter_mm": [d for _, d in rows],
        }
    )


def test_nodule_mask_paints_inside_and_reports_outside(geom):
    nodules = nodules_at(
        geom,
        [
            ((10.0, 20.0, 24.0), 8.0),  # inside
            ((-30.0, 20.0, 24.0), 8.0),  # 75 mm beyond the first slice
            ((-1.0, 20.0, 24.0), 10.0),  # centre outside, sphere reaching into slice 0
        ],
    )
    mask, report = nodule_mask(SHAPE_KJI, geom, nodules)
    assert mask.dtype == np.uint8 and mask.shape == SHAPE_KJI
    assert report["inside"].tolist() == [True, False, False]
    assert report["voxels"].iloc[1] == 0
    assert report["voxels"].iloc[2] > 0 and mask[0].any()
    assert mask[10, 20, 24] == 1
    # An 8 mm sphere holds about 268 mm3, i.e. about 122 voxels of 2.2 mm3.
    assert 100 <= report["voxels"].iloc[0] <= 145
    assert mask.sum() == report["voxels"].iloc[0] + report["voxels"].iloc[2]
    assert len(report) == len(nodules) and "inside" not in nodules.columns


def test_sphere_centre_round_trip_through_candidates(geom):
    # Annotation -> mask -> candidate comes back at the annotated world centre.
    centre = array_index_to_world(np.array([9.4, 18.2, 25.7]), geom)
    mask = sphere_mask(SHAPE_KJI, geom, centre, 6.0)
    cands = candidates_from_probability(mask.astype(float), geom, threshold=0.5)
    assert len(cands) == 1
    offset = world_to_array_index(cands[["coordX", "coordY", "coordZ"]].to_numpy()[0], geom)
    assert np.all(np.abs(offset - [9.4, 18.2, 25.7]) < 1.0)  # within a voxel on every axis


def test_two_nodules_joined_by_a_weak_bridge_are_two_detections_at_their_centres(geom):
    """The mask keeps two components (the bridge is under the voxel threshold), so the operating
    point, the FROC candidates and nodules.csv must see two detections, each at its own nodule,
    not one whose centroid falls between them (as candidates built at a lower level did)."""
    c1 = array_index_to_world(np.array([10.0, 14.0, 16.0]), geom)
    c2 = array_index_to_world(np.array([10.0, 14.0, 30.0]), geom)
    prob = gaussian_blobs(geom, [c1, c2], [0.95, 0.95])
    k, j, i = np.mgrid[: SHAPE_KJI[0], : SHAPE_KJI[1], : SHAPE_KJI[2]]
    bridge = (np.abs(k - 10) <= 1) & (np.abs(j - 14) <= 1) & (i >= 16) & (i <= 30)
    prob[bridge] = np.maximum(prob[bridge], 0.3)  # a 0.3 bridge joins the two blobs
    mask, cands = find_nodules(prob, geom, threshold=0.5, component_threshold=0.9)
    assert ndimage.label(mask, structure=np.ones((3, 3, 3)))[1] == 2
    detected = cands[cands["detected"]]
    assert len(detected) == 2
    for centre in (c1, c2):
        dist = np.linalg.norm(detected[["coordX", "coordY", "coordZ"]].to_numpy() - centre, axis=1)
        assert dist.min() < 1.5, dist
    # Each detection is one mask component: their volumes add up to the mask.
    assert detected["volume_mm3"].sum() == pytest.approx(mask.sum() * geom.voxel_volume_mm3)


def test_small_components_are_neither_candidates_nor_mask(geom):
    prob = np.zeros(SHAPE_KJI)
    prob[5:8, 5:8, 5:8] = 0.95  # 27 voxels of 2.2 mm3
    prob[15, 30, 30] = 0.99  # one voxel: under min_volume_mm3
    mask, cands = find_nodules(prob, geom, 0.5, 0.9, min_volume_mm3=5 * geom.voxel_volume_mm3)
    assert len(cands) == 1 and cands["detected"].all()
    assert mask.sum() == 27 and not mask[15, 30, 30]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_component_max_agrees_with_ndimage_maximum(dtype):
    rng = np.random.default_rng(3)
    prob = ndimage.gaussian_filter(rng.random((30, 40, 50)), 1.5).astype(dtype)
    labels, n = ndimage.label(prob > np.quantile(prob, 0.9), structure=np.ones((3, 3, 3)))
    assert n > 10
    expected = np.asarray(ndimage.maximum(prob, labels, np.arange(1, n + 1)))
    got = component_max(prob, labels, n)
    assert got.dtype == dtype and np.array_equal(got, expected)
    assert component_max(prob, np.zeros_like(labels), 0).shape == (0,)
