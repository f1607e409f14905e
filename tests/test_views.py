"""Multi-view 2.5D: slabs along axial, coronal and sagittal axes, probabilities averaged."""

import numpy as np
import pytest
import torch

from ctpipe import data, infer
from ctpipe.fileio import write_json
from ctpipe.predict import predict_probability
from ctpipe.views import VIEWS, check_views, from_view, in_view

ALL = ("axial", "coronal", "sagittal")


@pytest.mark.parametrize("view", list(VIEWS))
def test_a_view_and_back_is_the_identity(view):
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    seen = in_view(vol, view)
    assert seen.shape[0] == vol.shape[VIEWS[view][0]]
    np.testing.assert_array_equal(from_view(seen, view), vol)


def test_coronal_slab_holds_one_row_of_every_slice():
    vol = np.random.default_rng(0).normal(size=(4, 5, 6))
    np.testing.assert_array_equal(in_view(vol, "coronal")[2], vol[:, 2, :])
    np.testing.assert_array_equal(in_view(vol, "sagittal")[3], vol[:, :, 3])


@pytest.mark.parametrize("bad", [[], ["axial", "axial"], ["oblique"]])
def test_bad_views_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="views must be"):
        check_views(bad)


def _pointwise(x: torch.Tensor) -> torch.Tensor:
    """Logits that depend on the centre channel's voxel only: any view must give the same answer."""
    c = x[:, x.shape[1] // 2 : x.shape[1] // 2 + 1]
    return torch.cat([-c, c], dim=1)


def test_views_put_every_prediction_back_where_it_belongs():
    vol = np.random.default_rng(1).normal(size=(9, 20, 14)).astype(np.float32)
    expected = 1 / (1 + np.exp(-2 * vol))
    for views in (("axial",), ("coronal",), ("sagittal",), ALL):
        prob = infer.predict_volume(_pointwise, vol, context=1, roi_size=16, overlap=0.5, views=views)
        np.testing.assert_allclose(prob, expected, atol=1e-5, err_msg=str(views))


def test_three_views_are_the_mean_of_each_view():
    """With a network that looks at its neighbours the views differ; the result is their mean."""
    vol = np.random.default_rng(2).normal(size=(10, 18, 22)).astype(np.float32)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    torch.manual_seed(0)
    torch.nn.init.normal_(conv.weight)
    run = lambda x: conv(x)  # noqa: E731
    per_view = [infer.predict_volume(run, vol, 1, 32, 0.0, views=(v,)) for v in ALL]
    assert np.abs(per_view[0] - per_view[1]).max() > 0.1  # the views do see different things
    both = infer.predict_volume(run, vol, 1, 32, 0.0, views=ALL)
    np.testing.assert_allclose(both, np.mean(per_view, axis=0), atol=1e-5)


class _Session:
    """The two calls predict makes on an onnxruntime.InferenceSession, over a torch module."""

    def __init__(self, module):
        self.module = module

    def get_inputs(self):
        return [type("Input", (), {"name": "x"})()]

    def run(self, _, feeds):
        with torch.no_grad():
            return [self.module(torch.from_numpy(feeds["x"])).numpy()]


def test_predict_without_torch_agrees_with_the_pipeline_on_three_views():
    vol = np.random.default_rng(3).normal(size=(8, 40, 36)).astype(np.float32)
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    ref = infer.predict_volume(conv, vol, 1, 32, 0.5, views=ALL)
    ours = predict_probability(_Session(conv), vol, 1, 32, 0.5, views=ALL)
    assert np.abs(ours - ref).max() < 1e-2


def _tube_dataset(tmp_path, views):
    """One case whose nodule label is a line along z: a dot in axial slabs, a line in the others."""
    image = np.zeros((12, 24, 24), np.float16)
    label = np.zeros((12, 24, 24), np.uint8)
    label[:, 10, 13] = 1
    (tmp_path / "cases").mkdir()
    np.save(tmp_path / "cases" / "c0.image.npy", image)
    np.save(tmp_path / "cases" / "c0.label.npy", label)
    geometry = {"origin": [0.0, 0.0, 0.0], "spacing": [1.0, 1.0, 1.0], "direction": np.eye(3).ravel().tolist()}
    write_json(tmp_path / "index.json", {"cases": [{"case_id": "c0", "geometry": geometry}]})
    return data.SlabPatchDataset(tmp_path, ["c0"], 16, 1, 40, 1.0, seed=0, augment=False, views=views)


def test_training_patches_come_from_every_view(tmp_path):
    ds = _tube_dataset(tmp_path, ALL)
    lengths = [int(ds[i]["label"].sum()) for i in range(40)]
    assert set(lengths) - {1}, "no coronal or sagittal patch among 40"  # a line: several voxels
    assert 1 in lengths, "no axial patch among 40"  # the tube's cross-section: one voxel


def test_axial_only_training_sees_cross_sections_only(tmp_path):
    ds = _tube_dataset(tmp_path, ("axial",))
    assert {int(ds[i]["label"].sum()) for i in range(40)} == {1}
