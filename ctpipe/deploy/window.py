"""Whole-volume inference with an ONNX Runtime session, as the exported package runs it: slab by
slab along each view, each slab in one pass or in Gaussian-blended sliding windows (sigma = side
/ 8, as MONAI's and nnU-Net's default), optionally mirrored, the views averaged. No PyTorch."""

from __future__ import annotations

import numpy as np

from ctpipe.model.views import mean_over_views, slab_by_slab, whole_slab_roi


def gaussian_weights(rows: int, cols: int | None = None) -> np.ndarray:
    """Blending weights of one window (sigma = side / 8, as MONAI's and nnU-Net's default)."""

    def bell(size: int) -> np.ndarray:
        x = np.arange(size) - (size - 1) / 2
        return np.exp(-0.5 * (x / (size * 0.125)) ** 2)

    w = np.outer(bell(rows), bell(rows if cols is None else cols))
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def _starts(size: int, roi: int, step: int) -> list[int]:
    starts = list(range(0, max(size - roi, 0) + 1, step))
    if starts[-1] + roi < size:
        starts.append(size - roi)
    return starts


def sliding_window(run, x: np.ndarray, roi, overlap: float) -> np.ndarray:
    """Logits ``[n, classes, H, W]`` of ``x [n, C, H, W]``, windows of ``roi`` (a side, or
    ``(rows, cols)``) blended by a Gaussian; a slab smaller than the window is zero-padded."""
    n, _, h, w = x.shape
    rh, rw = (roi, roi) if np.isscalar(roi) else roi
    ph, pw = max(rh - h, 0), max(rw - w, 0)
    xp = np.pad(
        x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="constant"
    )
    H, W = xp.shape[2:]
    weights = gaussian_weights(rh, rw)
    out, norm = None, np.zeros((H, W), np.float32)
    for i in _starts(H, rh, max(int(rh * (1 - overlap)), 1)):
        for j in _starts(W, rw, max(int(rw * (1 - overlap)), 1)):
            logits = run(np.ascontiguousarray(xp[:, :, i : i + rh, j : j + rw]))
            if out is None:
                out = np.zeros((n, logits.shape[1], H, W), np.float32)
            out[:, :, i : i + rh, j : j + rw] += logits * weights
            norm[i : i + rh, j : j + rw] += weights
    out /= norm
    return out[:, :, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]


def predict_probability(
    session,
    volume: np.ndarray,
    context: int,
    roi: int,
    overlap: float,
    batch_slices: int = 16,
    views=("axial",),
    mirror_axes=(),
    whole_slab: bool = False,
    box=None,
) -> np.ndarray:
    """Foreground probability ``[K, H, W]`` of a normalised volume, with an ONNX Runtime session:
    the mean over ``views`` (:mod:`ctpipe.model.views`) of the slab-by-slab prediction along each, each
    slab also mirrored along ``mirror_axes``; ``whole_slab``: each slab in one pass
    (:func:`ctpipe.model.views.whole_slab_roi`) instead of windows of ``roi``; ``box``: only this
    part of the volume (:func:`ctpipe.model.views.lung_roi`), 0 elsewhere."""
    name = session.get_inputs()[0].name
    run = lambda x: session.run(None, {name: x.astype(np.float32)})[0]  # noqa: E731

    def window_prob(slabs: np.ndarray) -> np.ndarray:
        window = whole_slab_roi(*slabs.shape[2:]) if whole_slab else roi
        logits = sliding_window(run, slabs, window, overlap)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e[:, 1] / e.sum(axis=1)

    return mean_over_views(
        volume,
        views,
        lambda seen: slab_by_slab(seen, context, batch_slices, mirror_axes, window_prob),
        box,
    )
