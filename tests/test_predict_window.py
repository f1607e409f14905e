"""predict's NumPy sliding window (no PyTorch at run time) agrees with MONAI's."""

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ctpipe.deploy.window import gaussian_weights, sliding_window
from ctpipe.model.nets import build_network


def test_pointwise_predictor_is_reproduced_exactly():
    """Blending any weights over a per-pixel function returns that function."""
    x = np.random.default_rng(0).normal(size=(3, 3, 70, 45)).astype(np.float32)
    run = lambda a: np.concatenate([a[:, 1:2] * 2, -a[:, 1:2]], axis=1)  # noqa: E731
    out = sliding_window(run, x, roi=32, overlap=0.5)
    np.testing.assert_allclose(out, run(x), rtol=1e-5, atol=1e-5)


def test_matches_monai_on_a_network():
    torch.manual_seed(0)
    net = build_network({"context_slices": 1, "features": [4, 4, 8, 8, 16, 4]}).eval()
    x = np.random.default_rng(1).normal(size=(2, 3, 80, 56)).astype(np.float32)
    with torch.no_grad():
        ref = sliding_window_inference(
            torch.from_numpy(x), (32, 32), 4, net, overlap=0.5, mode="gaussian"
        ).numpy()
        ours = sliding_window(lambda a: net(torch.from_numpy(a)).numpy(), x, roi=32, overlap=0.5)
    assert ours.shape == ref.shape
    # Same windows, same Gaussian (sigma = roi / 8); MONAI clamps tiny weights slightly differently.
    assert np.abs(ours - ref).max() < 1e-2
    assert ((ours.argmax(1) == ref.argmax(1)).mean()) > 0.999


def test_gaussian_weights_peak_in_the_middle():
    w = gaussian_weights(32)
    assert w.shape == (32, 32) and w.max() == 1.0 and w[0, 0] < w[16, 16]
