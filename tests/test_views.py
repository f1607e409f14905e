"""Multi-view 2.5D: slabs along axial, coronal and sagittal axes, probabilities averaged."""

import numpy as np
import pytest
import torch

from ctpipe.deploy.window import predict_probability
from ctpipe.fileio import write_json
from ctpipe.model import data, infer
from ctpipe.model.views import (
    VIEWS,
    check_views,
    from_view,
    in_view,
    lung_box,
    lung_roi,
    mean_over_mirrors,
    mean_over_views,
    mirror_combinations,
    slabs,
    whole_slab_roi,
)
from ctpipe.volumes import case_files, write_volume

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
        prob = infer.predict_volume(
            _pointwise, vol, context=1, roi_size=16, overlap=0.5, views=views
        )
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


@pytest.mark.parametrize("mirror_axes", [(), (0, 1)])
def test_predict_without_torch_agrees_with_the_pipeline_on_three_views(mirror_axes):
    vol = np.random.default_rng(3).normal(size=(8, 40, 36)).astype(np.float32)
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    ref = infer.predict_volume(conv, vol, 1, 32, 0.5, views=ALL, mirror_axes=mirror_axes)
    ours = predict_probability(_Session(conv), vol, 1, 32, 0.5, views=ALL, mirror_axes=mirror_axes)
    assert np.abs(ours - ref).max() < 1e-2


@pytest.mark.parametrize(
    "axes, expected", [([], [()]), ([1], [(), (1,)]), ([0, 1], [(), (0,), (1,), (0, 1)])]
)
def test_mirror_combinations_are_every_subset(axes, expected):
    assert mirror_combinations(axes) == expected


@pytest.mark.parametrize("bad", [[2], [0, 0], [-1]])
def test_bad_mirror_axes_are_refused(bad):
    with pytest.raises(ValueError, match="mirror_axes"):
        mirror_combinations(bad)


def test_mirroring_a_one_sided_prediction_averages_both_sides():
    """A 'network' that sums each row from the left: mirrored along columns it sums from the right,
    so the mean is (prefix + suffix) / 2, worked out here without any flipping."""
    x = np.random.default_rng(4).normal(size=(2, 3, 4, 5)).astype(np.float32)
    prefix = lambda s: np.cumsum(s[:, 1], axis=-1)  # noqa: E731
    ones_only = mean_over_mirrors(x, [], prefix)
    np.testing.assert_allclose(ones_only, np.cumsum(x[:, 1], axis=-1), rtol=1e-6)
    centre = x[:, 1]
    expected = np.empty_like(centre)
    for j in range(centre.shape[-1]):
        expected[..., j] = (centre[..., : j + 1].sum(-1) + centre[..., j:].sum(-1)) / 2
    np.testing.assert_allclose(mean_over_mirrors(x, [1], prefix), expected, rtol=1e-5, atol=1e-6)


def test_mirrored_passes_equal_the_network_with_mirrored_kernels():
    """A convolution of a mirrored slab, mirrored back, is the convolution with the mirrored kernel:
    four passes of ``conv`` must equal the mean of one pass of each of the four kernels."""
    vol = np.random.default_rng(5).normal(size=(6, 20, 24)).astype(np.float32)
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    torch.nn.init.normal_(conv.weight)
    kernels = []
    for dims in ((), (2,), (3,), (2, 3)):
        k = torch.nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            k.weight.copy_(torch.flip(conv.weight, dims) if dims else conv.weight)
            k.bias.copy_(conv.bias)
        kernels.append(k)
    with torch.no_grad():
        ours = infer.predict_volume(conv, vol, 1, 32, 0.0, views=ALL, mirror_axes=(0, 1))
        ref = np.mean(
            [infer.predict_volume(k, vol, 1, 32, 0.0, views=ALL) for k in kernels], axis=0
        )
        single = infer.predict_volume(conv, vol, 1, 32, 0.0, views=ALL)
    assert np.abs(single - ref).max() > 0.05  # mirroring does change this network's answer
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def _tube_dataset(tmp_path, views):
    """One case whose nodule label is a line along z: a dot in axial slabs, a line in the others."""
    image = np.zeros((12, 24, 24), np.float16)
    label = np.zeros((12, 24, 24), np.uint8)
    label[:, 10, 13] = 1
    (tmp_path / "cases").mkdir()
    write_volume(case_files(tmp_path, "c0")[0], image)
    write_volume(case_files(tmp_path, "c0")[1], label)
    geometry = {
        "origin": [0.0, 0.0, 0.0],
        "spacing": [1.0, 1.0, 1.0],
        "direction": np.eye(3).ravel().tolist(),
    }
    write_json(tmp_path / "index.json", {"cases": [{"case_id": "c0", "geometry": geometry}]})
    return data.SlabPatchDataset(
        tmp_path, ["c0"], 16, 1, 40, 1.0, seed=0, augment=False, views=views
    )


def test_training_patches_come_from_every_view(tmp_path):
    ds = _tube_dataset(tmp_path, ALL)
    lengths = [int(ds[i]["label"].sum()) for i in range(40)]
    assert set(lengths) - {1}, "no coronal or sagittal patch among 40"  # a line: several voxels
    assert 1 in lengths, "no axial patch among 40"  # the tube's cross-section: one voxel


def test_axial_only_training_sees_cross_sections_only(tmp_path):
    ds = _tube_dataset(tmp_path, ("axial",))
    assert {int(ds[i]["label"].sum()) for i in range(40)} == {1}


@pytest.mark.parametrize("mirror_axes", [(), (0, 1)])
def test_whole_slab_predict_agrees_with_the_pipeline(mirror_axes):
    """Whole-slab inference (one pass per slab, padded to 16) is the same in predict (NumPy, ORT
    session) and in the pipeline (MONAI): 40 x 36 slabs go through as 48 x 48 (axial) etc."""
    vol = np.random.default_rng(3).normal(size=(8, 40, 36)).astype(np.float32)
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    seen = []

    def spy(x):
        seen.append(tuple(x.shape[2:]))
        return conv(x)

    ref = infer.predict_volume(
        spy, vol, 1, 32, 0.5, views=ALL, mirror_axes=mirror_axes, whole_slab=True
    )
    assert set(seen) == {(48, 48), (16, 48)}  # axial slabs 40 x 36; coronal 8 x 36, sagittal 8 x 40
    ours = predict_probability(
        _Session(conv), vol, 1, 32, 0.5, views=ALL, mirror_axes=mirror_axes, whole_slab=True
    )
    assert np.abs(ours - ref).max() < 1e-5


def test_whole_slab_is_the_network_on_the_whole_slab_without_seams():
    """For a convolution (zero padding), one padded pass is exactly the network applied to the
    whole slab; blended windows are not: each window pads its own borders, a seam inside the slab."""
    vol = np.random.default_rng(4).normal(size=(6, 70, 50)).astype(np.float32)
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    with torch.no_grad():
        logits = conv(torch.from_numpy(slabs(vol, np.arange(vol.shape[0]), 1)))
    direct = torch.softmax(logits, 1)[:, 1].numpy()
    whole = infer.predict_volume(conv, vol, 1, 32, 0.5, views=("axial",), whole_slab=True)
    windows = infer.predict_volume(conv, vol, 1, 32, 0.5, views=("axial",))
    np.testing.assert_allclose(whole, direct, atol=1e-5)
    assert np.abs(windows - direct).max() > 1e-2  # the seams whole_slab does away with


def test_whole_slab_logits_are_monai_sliding_window_with_one_window():
    """The one-pass shortcut pads where ``sliding_window_inference`` pads (a strided network sees
    where the padding went) and gives its logits."""
    from monai.inferers import sliding_window_inference

    torch.manual_seed(5)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Upsample(scale_factor=2)
    )
    x = torch.from_numpy(np.random.default_rng(5).normal(size=(5, 3, 37, 22)).astype(np.float32))
    with torch.no_grad():
        ref = sliding_window_inference(x, whole_slab_roi(37, 22), 8, net, mode="gaussian")
        ours = infer.whole_slab_logits(net, x)
        shifted = net(torch.nn.functional.pad(x, (0, 10, 0, 11)))[:, :, :37, :22]
    assert ours.shape == (5, 4, 37, 22)
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-5)
    assert (shifted - ref).abs().max() > 1e-2  # padding all after the slab is another result


@pytest.mark.parametrize(
    "h, w, expected", [(40, 36, (48, 48)), (16, 17, (16, 32)), (1, 200, (16, 208))]
)
def test_whole_slab_roi_rounds_up_to_16(h, w, expected):
    assert whole_slab_roi(h, w) == expected


def _two_lungs(shape=(20, 40, 60)) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """A body (1.0) in air (-10), two box-shaped lungs (-8) and a small air pocket (-8) in the body
    wall, which is under 1 % of a lung and is left out."""
    vol = np.full(shape, -10.0, np.float32)
    vol[2:18, 5:35, 5:55] = 1.0
    lungs = [np.s_[4:16, 10:30, 10:25], np.s_[5:17, 12:28, 33:50]]
    for box in lungs:
        vol[box] = -8.0
    vol[10, 32, 30] = -8.0
    return vol, lungs


def test_lung_box_is_the_lungs_grown_by_the_margin():
    vol, _ = _two_lungs()
    box = lung_box(vol, level=-5.0, margin=(1, 2, 3))
    assert box == (slice(3, 18), slice(8, 32), slice(7, 53))


@pytest.mark.parametrize("fill", [-10.0, 1.0])
def test_lung_box_is_none_without_lungs(fill):
    """All air (nothing inside a body) or all tissue: no lungs, the caller predicts everything."""
    assert lung_box(np.full((6, 20, 20), fill, np.float32), level=-5.0, margin=(1, 1, 1)) is None


@pytest.mark.parametrize("bad", [-1, "ten", float("nan"), [10]])
def test_lung_roi_refuses_a_bad_margin_with_the_param_and_the_value(bad):
    vol = np.zeros((4, 8, 8), np.float32)
    plan = {"body_threshold_hu": -500, "normalization": {"clip": [-1000, 400], "mean": 0, "std": 1}}
    with pytest.raises(ValueError, match=r"inference\.lung_margin_mm .*got"):
        lung_roi(vol, plan, (2.0, 1.0, 1.0), bad)


def test_lung_roi_reads_level_and_margin_from_the_plan():
    vol, _ = _two_lungs()
    plan = {
        "body_threshold_hu": -500.0,
        "normalization": {"clip": [-1000.0, 400.0], "mean": 0.0, "std": 100.0},
    }  # -500 HU is -5.0 here
    assert lung_roi(vol, plan, (2.0, 1.0, 1.0), 3.0) == lung_box(vol, -5.0, (2, 3, 3))
    assert lung_roi(vol, plan, (2.0, 1.0, 1.0), None) is None


def test_prediction_in_a_box_is_the_cropped_volume_and_zero_outside():
    vol = np.random.default_rng(5).normal(size=(8, 30, 26)).astype(np.float32)
    box = np.s_[1:7, 4:25, 3:20]
    fn = lambda seen: 1.0 / (1.0 + np.exp(-seen.astype(np.float32)))  # noqa: E731
    out = mean_over_views(vol, ALL, fn, box)
    np.testing.assert_allclose(out[box], mean_over_views(vol[box], ALL, fn), atol=1e-7)
    outside = np.ones(vol.shape, bool)
    outside[box] = False
    assert not out[outside].any()


def test_predict_and_the_pipeline_agree_inside_a_lung_box():
    vol, _ = _two_lungs()
    vol = vol + np.random.default_rng(6).normal(scale=0.1, size=vol.shape).astype(np.float32)
    box = lung_box(vol, -5.0, (1, 2, 2))
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    ref = infer.predict_volume(conv, vol, 1, 32, 0.5, views=ALL, whole_slab=True, box=box)
    ours = predict_probability(_Session(conv), vol, 1, 32, 0.5, views=ALL, whole_slab=True, box=box)
    assert np.abs(ours - ref).max() < 1e-5
    assert ref[box].any() and not ref[: box[0].start].any()
