"""evaluate's runtimes: ONNX Runtime (CPU default) and PyTorch give the same probabilities."""

import numpy as np
import pytest
import torch

from ctpipe.deploy.runtime import make_predictor, resolve_runtime
from ctpipe.model import infer, nets

TINY = {"context_slices": 1, "features": [4, 4, 8, 8, 16, 4]}


@pytest.fixture
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = nets.build_network(TINY).eval()
    with torch.no_grad():  # larger weights than the initialisation, so the map is far from constant
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return net


def test_auto_without_cuda_runs_the_exported_model_in_onnxruntime(net, tmp_path, monkeypatch):
    """Where there is no CUDA device, ``auto`` exports the network to ``workdir`` and runs that
    file in ONNX Runtime; ``torch`` exports nothing. Both give PyTorch's logits."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Slab sizes divisible by 16, as the sliding window feeds them (four 2x poolings).
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 48, 32)).astype(np.float32))
    with torch.no_grad():
        expected = net(x).numpy()
    assert expected.std() > 0.1  # logits that differ from pixel to pixel
    logits = {}
    for runtime in ("auto", "torch"):
        (tmp_path / runtime).mkdir()
        predictor = make_predictor(net, nets.in_channels(TINY), runtime, tmp_path / runtime)
        with torch.no_grad():
            out = predictor(x)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        logits[runtime] = out.numpy()
    assert [p.name for p in (tmp_path / "auto").iterdir()] == ["model.onnx"]
    assert not any((tmp_path / "torch").iterdir())
    assert logits["auto"].shape == expected.shape == (2, 2, 48, 32)
    np.testing.assert_allclose(logits["auto"], expected, atol=1e-4)
    np.testing.assert_allclose(logits["torch"], expected, atol=1e-4)  # channels-last kernels
    assert resolve_runtime("auto") == "onnxruntime"


def test_unknown_runtime_is_refused_by_name():
    with pytest.raises(ValueError, match="inference.runtime"):
        resolve_runtime("tensorrt")


def test_onnxruntime_and_torch_predict_the_same_volume(net, tmp_path):
    vol = np.random.default_rng(0).normal(size=(6, 40, 36)).astype(np.float32)
    probs = {}
    for runtime in ("torch", "onnxruntime"):
        (tmp_path / runtime).mkdir()
        predictor = make_predictor(net, nets.in_channels(TINY), runtime, tmp_path / runtime)
        probs[runtime] = infer.predict_volume(
            predictor, vol, 1, 32, 0.5, views=("axial", "coronal"), mirror_axes=(1,)
        )
    assert (tmp_path / "onnxruntime" / "model.onnx").exists()
    assert probs["torch"].std() > 0.05  # not a constant map
    np.testing.assert_allclose(probs["onnxruntime"], probs["torch"], atol=1e-4)
