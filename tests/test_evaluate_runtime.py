"""evaluate's runtimes: ONNX Runtime (CPU default) on train's ONNX export and PyTorch give the
same probabilities."""

import numpy as np
import pytest
import torch

from ctpipe import config
from ctpipe.deploy import onnx_export, runtime, sessions
from ctpipe.deploy.runtime import make_predictor, resolve_runtime
from ctpipe.model import data, infer, nets

TINY = {"context_slices": 1, "features": [4, 4, 8, 8, 16, 4]}


@pytest.fixture
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = nets.build_network(TINY).eval()
    with torch.no_grad():  # larger weights than the initialisation, so the map is far from constant
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return net


@pytest.fixture
def onnx_path(net, tmp_path):
    """``net`` exported as train exports models/model.onnx."""
    path = tmp_path / "model.onnx"
    onnx_export.export_onnx(net, nets.in_channels(TINY), path, onnx_export.OPSET)
    return path


def test_auto_without_cuda_runs_the_exported_model_in_onnxruntime(
    net, onnx_path, tmp_path, monkeypatch
):
    """Where there is no CUDA device, ``auto`` runs the given ONNX file in ONNX Runtime;
    ``torch`` never opens it. Both give PyTorch's logits."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    opened = []
    real_session = sessions.ort_session
    monkeypatch.setattr(
        sessions, "ort_session", lambda path: opened.append(path) or real_session(path)
    )
    # Slab sizes divisible by 16, as the sliding window feeds them (four 2x poolings).
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 48, 32)).astype(np.float32))
    with torch.no_grad():
        expected = net(x).numpy()
    assert expected.std() > 0.1  # logits that differ from pixel to pixel
    logits = {}
    for name in ("auto", "torch"):
        predictor = make_predictor(net, name, onnx_path if name == "auto" else tmp_path / "none")
        with torch.no_grad():
            out = predictor(x)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        logits[name] = out.numpy()
    assert opened == [onnx_path]  # auto: the given file; torch: none
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # nothing exported
    assert logits["auto"].shape == expected.shape == (2, 2, 48, 32)
    np.testing.assert_allclose(logits["auto"], expected, atol=1e-4)
    np.testing.assert_allclose(logits["torch"], expected, atol=1e-4)  # channels-last kernels
    assert resolve_runtime("auto") == "onnxruntime"


def test_unknown_runtime_is_refused_by_name():
    with pytest.raises(ValueError, match="inference.runtime"):
        resolve_runtime("tensorrt")


def test_onnxruntime_without_the_onnx_file_names_it(net, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx: no ONNX model"):
        runtime.make_predictor(net, "onnxruntime", tmp_path / "missing.onnx")


def test_onnxruntime_and_torch_predict_the_same_volume(net, onnx_path):
    vol = np.random.default_rng(0).normal(size=(6, 40, 36)).astype(np.float32)
    probs = {}
    for name in ("torch", "onnxruntime"):
        predictor = make_predictor(net, name, onnx_path)
        probs[name] = infer.predict_volume(
            predictor, vol, 1, 32, 0.5, views=("axial", "coronal"), mirror_axes=(1,)
        )
    assert probs["torch"].std() > 0.05  # not a constant map
    np.testing.assert_allclose(probs["onnxruntime"], probs["torch"], atol=1e-4)


def test_predict_cases_runs_the_inference_params_on_the_given_onnx(
    net, onnx_path, tmp_path, tiny_models
):
    """One ``config.Inference`` decides the runtime, views, mirroring and box of every case."""
    processed = tiny_models.make_processed(tmp_path / "processed")
    inference = config.Inference(
        runtime="onnxruntime",
        whole_slab=True,
        roi_size=32,
        overlap=0.5,
        views=["axial", "coronal"],
        mirror_axes=[1],
        min_candidate_mm3=1.0,
        lung_margin_mm=None,
    )
    cases, _ = data.split_cases(processed, "val")
    ((case, image, truth, prob, _),) = runtime.predict_cases(
        net, processed, cases, inference, 1, onnx_path
    )
    assert case is cases[0] and prob.shape == image.shape == truth.shape
    assert prob.dtype == np.float32 and truth.dtype == bool and truth.any()
    expected = infer.predict(infer.torch_predictor(net), image, 1, inference)
    assert expected.std() > 0.05  # not a constant map
    np.testing.assert_allclose(prob, expected, atol=1e-4)
    single = infer.predict(infer.torch_predictor(net), image, 1, inference, mirror=False)
    assert np.abs(single - expected).max() > 1e-3  # the mirrored passes were taken
