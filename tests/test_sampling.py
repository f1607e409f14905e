"""Training patches: hard negatives on lung structures, and scaled and rotated patches."""

from __future__ import annotations

import numpy as np
import pytest

from ctpipe.fileio import write_json
from ctpipe.model import data

PLAN = {
    "normalization": {"clip": [-1000.0, 400.0], "mean": 0.0, "std": 1.0},
    "body_threshold_hu": -500.0,
}


def _chest(shape=(12, 48, 64)) -> tuple[np.ndarray, np.ndarray, dict]:
    """A body (45 HU) in air, one lung (-850 HU) with a vessel along x and a nodule, in HU
    (the plan's normalisation is the identity). Returns image, label and named masks."""
    k, j, i = np.indices(shape)
    image = np.full(shape, -1000.0, np.float32)
    body = (j >= 4) & (j < 44) & (i >= 4) & (i < 60)
    image[body] = 45.0
    lung = body & ((j - 24) ** 2 / 15.0**2 + (i - 32) ** 2 / 24.0**2 <= 1)
    image[lung] = -850.0
    vessel = lung & (np.abs(j - 20) <= 1) & (np.abs(k - 6) <= 1) & (i >= 16) & (i < 40)
    image[vessel] = 40.0
    nodule = (k - 6) ** 2 + (j - 30) ** 2 + (i - 44) ** 2 <= 3**2
    image[nodule] = 40.0
    label = nodule.astype(np.uint8)
    return image, label, {"vessel": vessel, "nodule": nodule, "lung": lung, "body": body}


def test_lung_structures_are_vessels_not_nodules_pleura_or_skin():
    image, label, masks = _chest()
    found = np.zeros(image.shape, bool)
    found[tuple(data.lung_structures(image, label, PLAN).T)] = True
    vessel_core = masks["vessel"] & (np.abs(np.indices(image.shape)[2] - 28) <= 8)
    assert found[vessel_core].mean() > 0.9  # the vessel away from its ends
    assert not found[masks["nodule"]].any()
    chest_wall = masks["body"] & ~masks["lung"]
    assert not found[chest_wall].any()  # pleura, chest wall and skin: mostly not lung around
    assert found.sum() <= masks["vessel"].sum()


def _dataset(tmp_path, image, label, **kwargs) -> data.SlabPatchDataset:
    (tmp_path / "cases").mkdir(exist_ok=True)
    np.save(tmp_path / "cases" / "c0.image.npy", image.astype(np.float16))
    np.save(tmp_path / "cases" / "c0.label.npy", label.astype(np.uint8))
    geometry = {
        "origin": [0.0, 0.0, 0.0],
        "spacing": [1.0, 1.0, 2.0],
        "direction": np.eye(3).ravel().tolist(),
    }
    write_json(tmp_path / "index.json", {"cases": [{"case_id": "c0", "geometry": geometry}]})
    write_json(tmp_path / "plan.json", PLAN)
    return data.SlabPatchDataset(tmp_path, ["c0"], 16, 1, 50, seed=0, **kwargs)


def test_hard_fraction_centres_patches_on_lung_structures(tmp_path):
    image, label, masks = _chest()
    ds = _dataset(tmp_path, image, label, fg_fraction=0.0, hard_fraction=1.0)
    hard = data.lung_structures(image.astype(np.float16).astype(np.float32), label, PLAN)
    hard = {tuple(v) for v in hard}
    for item in range(50):
        _, centre = ds._centre(np.random.default_rng([0, 0, item]))
        assert tuple(int(c) for c in centre) in hard
    ds = _dataset(tmp_path, image, label, fg_fraction=0.0, hard_fraction=0.0)
    assert not ds.hard  # off by default: not even computed


def test_without_hard_or_affine_the_draws_are_those_of_plain_sampling(tmp_path):
    """The new options draw nothing when off, so runs with them off keep their patches."""
    image, label, _ = _chest()
    plain = _dataset(tmp_path, image, label, fg_fraction=0.5)
    off = _dataset(tmp_path, image, label, fg_fraction=0.5, hard_fraction=0.0, affine_prob=0.0)
    for item in range(10):
        a, b = plain[item], off[item]
        assert np.array_equal(a["image"].numpy(), b["image"].numpy())
        assert np.array_equal(a["label"].numpy(), b["label"].numpy())


def _ball(shape, centre, radius, spacing) -> np.ndarray:
    k, j, i = np.indices(shape)
    offsets = [(a - c) * s for a, c, s in zip((k, j, i), centre, spacing)]
    return (sum(o**2 for o in offsets) <= radius**2).astype(np.uint8)


def test_affine_patch_without_scale_or_turn_is_the_plain_crop():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(9, 40, 40)).astype(np.float32)
    label = (rng.random((9, 40, 40)) > 0.7).astype(np.uint8)
    img, lbl = data.affine_patch(image, label, (4, 20, 21), 2, 16, 1.0, 0.0, (2.0, 1.0, 1.0), -9.0)
    np.testing.assert_allclose(img, data.crop2d(image[2:7], 12, 13, 16, -9.0), atol=1e-6)
    np.testing.assert_array_equal(lbl, data.crop2d(label[4:5], 12, 13, 16, 0))


@pytest.mark.parametrize("scale", [0.7, 1.4])
def test_affine_patch_scales_in_every_direction(scale):
    """Seen with scale s, a ball of radius 8 mm on a 1 x 1 x 2 mm grid has radius 8 / s in the
    centre slice, and the slab's slices lie 2 mm * s apart (on an image whose value is the
    slice's height in mm, read exactly by linear interpolation)."""
    spacing = (2.0, 1.0, 1.0)
    label = _ball((21, 56, 56), (10, 28, 28), 8.0, spacing)
    _, lbl = data.affine_patch(label, label, (10, 28, 28), 2, 40, scale, 0.0, spacing, 0.0)
    assert lbl.sum() == pytest.approx(np.pi * (8.0 / scale) ** 2, rel=0.1)
    shape = (21, 96, 96)  # wide enough for the turned and scaled patch
    height = np.broadcast_to(np.arange(21, dtype=np.float32)[:, None, None] * 2.0, shape)
    img, _ = data.affine_patch(height, np.zeros(shape), (10, 48, 48), 2, 40, scale, 0.7, spacing, 0)
    for c, channel in zip(range(-2, 3), img):
        np.testing.assert_allclose(channel, 20.0 + 2.0 * c * scale, atol=1e-4)


def test_affine_patch_turns_in_mm_on_an_anisotropic_slab():
    """A quarter turn of a coronal slab (rows 2 mm, columns 1 mm) turns a bar 8 mm long and 2 mm
    wide into a bar 2 mm long and 8 mm wide: rows and columns swap their extents in mm."""
    spacing = (1.0, 2.0, 1.0)
    label = np.zeros((5, 24, 40), np.uint8)
    label[:, 10:14, 19:21] = 1  # 4 rows (8 mm) x 2 columns (2 mm)
    img, lbl = data.affine_patch(
        label.astype(np.float32), label, (2, 12, 20), 1, 24, 1.0, np.pi / 2, spacing, 0.0
    )
    rows, cols = np.nonzero(lbl[0])
    assert (rows.max() - rows.min() + 1) * 2.0 == pytest.approx(2.0, abs=2.0)
    assert (cols.max() - cols.min() + 1) * 1.0 == pytest.approx(8.0, abs=1.0)


def test_affine_patches_are_a_function_of_seed_epoch_and_item(tmp_path):
    image, label, _ = _chest()
    a = _dataset(tmp_path, image, label, fg_fraction=0.5, affine_prob=1.0)
    b = _dataset(tmp_path, image, label, fg_fraction=0.5, affine_prob=1.0)
    plain = _dataset(tmp_path, image, label, fg_fraction=0.5)
    for item in (0, 7, 31):
        np.testing.assert_array_equal(a[item]["image"].numpy(), b[item]["image"].numpy())
    assert any(
        not np.array_equal(a[item]["image"].numpy(), plain[item]["image"].numpy())
        for item in range(5)
    )


@pytest.mark.parametrize(
    "change, name",
    [
        ({"hard_fraction": 0.8, "fg_fraction": 0.5}, "hard_fraction"),
        ({"affine_prob": 1.5}, "affine_prob"),
        ({"scale_range": [1.4, 0.7]}, "scale_range"),
        ({"scale_range": [0.0, 1.0]}, "scale_range"),
        ({"scale_range": 1.2}, "scale_range"),
        ({"scale_range": [0.7, "big"]}, "scale_range"),
        ({"hard_fraction": "half"}, "hard_fraction"),
        ({"affine_prob": None}, "affine_prob"),
    ],
)
def test_bad_sampling_params_are_refused(tmp_path, change, name):
    image, label, _ = _chest()
    kwargs = {"fg_fraction": 0.3, **change}
    with pytest.raises(ValueError, match=name):
        _dataset(tmp_path, image, label, **kwargs)
