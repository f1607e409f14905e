"""evaluate's runtimes: ONNX Runtime (CPU default) and PyTorch give the same probabilities."""

import numpy as np
import pytest
import torch

from ctpipe import infer, nets
from ctpipe.runtime import make_predictor, resolve_runtime

TINY = {"context_slices": 1, "features": [4, 4, 8, 8, 16, 4]}


def test_auto_is_torch_on_cuda_and_onnxruntime_otherwise():
    assert resolve_runtime("auto") == ("torch" if torch.cuda.is_available() else "onnxruntime")
    assert resolve_runtime("torch") == "torch"


def test_unknown_runtime_is_refused_by_name():
    with pytest.raises(ValueError, match="inference.runtime"):
        resolve_runtime("tensorrt")


def test_onnxruntime_and_torch_predict_the_same_volume(tmp_path):
    torch.manual_seed(0)
    net = nets.build_network(TINY).eval()
    with torch.no_grad():  # larger weights than the initialisation, so the map is far from constant
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    vol = np.random.default_rng(0).normal(size=(6, 40, 36)).astype(np.float32)
    probs = {}
    for runtime in ("torch", "onnxruntime"):
        (tmp_path / runtime).mkdir()
        predictor = make_predictor(net, nets.in_channels(TINY), runtime, tmp_path / runtime)
        probs[runtime] = infer.predict_volume(predictor, vol, 1, 32, 0.5, views=("axial", "coronal"),
                                              mirror_axes=(1,))
    assert (tmp_path / "onnxruntime" / "model.onnx").exists()
    assert probs["torch"].std() > 0.05  # not a constant map
    np.testing.assert_allclose(probs["onnxruntime"], probs["torch"], atol=1e-4)
