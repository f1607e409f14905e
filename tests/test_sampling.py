"""Training patches: nodules drawn uniformly, hard negatives on lung structures."""

from __future__ import annotations

import numpy as np
import pytest

from ctpipe import config
from ctpipe.fileio import write_json
from ctpipe.model import data
from ctpipe.model.views import VIEWS, in_view
from ctpipe.volumes import case_files, open_volume, write_volume

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
    write_volume(case_files(tmp_path, "c0")[0], image.astype(np.float16))
    write_volume(case_files(tmp_path, "c0")[1], label.astype(np.uint8))
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


def test_without_hard_the_draws_are_those_of_plain_sampling(tmp_path):
    """Hard negatives draw nothing when off, so runs with them off keep their patches."""
    image, label, _ = _chest()
    plain = _dataset(tmp_path, image, label, fg_fraction=0.5)
    off = _dataset(tmp_path, image, label, fg_fraction=0.5, hard_fraction=0.0)
    for item in range(10):
        a, b = plain[item], off[item]
        assert np.array_equal(a["image"].numpy(), b["image"].numpy())
        assert np.array_equal(a["label"].numpy(), b["label"].numpy())


def test_foreground_patches_are_drawn_uniformly_over_nodules(tmp_path):
    """A nodule of 8 voxels and one of several hundred get about as many patches each."""
    image, label, _ = _chest()
    label[:] = 0
    label[6, 10:12, 40:44] = 1  # small: 8 voxels
    k, j, i = np.indices(label.shape)
    label[(k - 6) ** 2 / 2 + (j - 30) ** 2 + (i - 44) ** 2 <= 5**2] = 1  # large, apart from it
    ds = _dataset(tmp_path, image, label, fg_fraction=1.0)
    assert sorted(len(v) for _, v in ds.nodules)[0] == 8 and len(ds.nodules) == 2
    small = sum(int(ds._centre(np.random.default_rng([0, 0, n]))[1][1]) < 20 for n in range(200))
    assert 70 <= small <= 130  # binomial(200, 0.5): 100 +- 3.5 sd


def _old_slab(volume, view, k, context, j0, i0, size, pad):
    """The slab as the sampler cut it from a whole in-memory volume: the reference."""
    seen = in_view(volume, view)
    ks = np.clip(np.arange(k - context, k + context + 1), 0, seen.shape[0] - 1)
    return data.crop2d(np.asarray(seen[ks], dtype=np.float32), j0, i0, size, pad)


@pytest.mark.parametrize("view", list(VIEWS))
def test_a_slab_read_from_its_box_equals_one_cut_from_the_whole_volume(tmp_path, view):
    """The sampler decompresses only the box its patch covers; the patch must be the one the whole
    volume gives, at the volume's edges (repeated slices, padding) as inside it."""
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(21, 40, 70)).astype(np.float16)  # spans several 16 x 64 x 64 chunks
    write_volume(tmp_path / "v.b2nd", volume)
    stored = open_volume(tmp_path / "v.b2nd")
    shape = in_view(volume, view).shape
    for k, j0, i0 in [
        (0, -5, -5),
        (shape[0] - 1, shape[1] - 3, shape[2] - 3),
        (7, 3, 20),
        (3, -40, 2),
    ]:
        got = data.read_slab(stored, view, k, 2, j0, i0, 16, -1.5)
        assert got.dtype == np.float32 and got.shape == (5, 16, 16)
        np.testing.assert_array_equal(got, _old_slab(volume, view, k, 2, j0, i0, 16, -1.5))


def test_the_dataset_keeps_no_volume_between_items(tmp_path):
    """What stays per case is its shape and int16 nodule voxels, not its arrays: memory grows
    with the number of nodules, not with the number or size of the volumes."""
    image, label, _ = _chest()
    ds = _dataset(tmp_path, image, label, fg_fraction=0.5, hard_fraction=0.2)
    for item in range(20):
        assert ds[item]["image"].shape == (3, 16, 16)
    held = [v for v in vars(ds).values() if isinstance(v, np.ndarray) and v.size >= image.size]
    assert held == []
    assert all(v.dtype == np.int16 for _, v in ds.nodules + ds.hard)
    assert sum(v.nbytes for _, v in ds.nodules + ds.hard) < image.nbytes / 4


@pytest.mark.parametrize(
    "change, name",
    [
        ({"hard_fraction": 0.8, "fg_fraction": 0.5}, "hard_fraction"),
        ({"hard_fraction": "half"}, "hard_fraction"),
        ({"fg_fraction": 1.5}, "fg_fraction"),
        ({"views": ["axial", "oblique"]}, "views"),
        ({"affine_prob": 0.2}, "affine_prob"),  # deleted with its path (commit 8e68312 has it)
        ({"fg_sampling": "voxel"}, "fg_sampling"),
    ],
)
def test_bad_sampling_params_are_refused(tiny_params, change, name):
    params = tiny_params()
    params["train"].update(change)
    with pytest.raises(config.ConfigError, match=name):
        config.validate(params)
