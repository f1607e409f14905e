"""Whole-volume inference for the 2.5D network, shared by evaluate, quantize, export and predict.

A volume ``[K, H, W]`` becomes ``K`` slabs ``[2c+1, H, W]`` (edge slices replicated); each slab
goes through the network in one pass (``whole_slab``, the pipeline's default) or through MONAI's
sliding-window inference with Gaussian blending, in batches of slabs. The
predictor is any callable from a float32 tensor ``[B, C, h, w]`` to logits ``[B, 2, h, w]``: a
PyTorch module, or an ONNX Runtime session wrapped by :func:`onnx_predictor`.

Views (multi-view 2.5D, as in Setio et al.'s LUNA16 false-positive reduction): the same network
also reads the volume sliced along the other two axes (``coronal``: slabs of rows ``j``,
``sagittal``: of columns ``i``) and the foreground probabilities of the views are averaged. A vessel
running through the axial plane looks like a nodule in an axial slab, but like the tube it is in
the other two; a nodule is round in all three.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ctpipe.model.nets import MEMORY_FORMAT
from ctpipe.model.views import mean_over_views, slab_by_slab, whole_slab_roi

if TYPE_CHECKING:
    from ctpipe.config import Inference

Predictor = Callable[[torch.Tensor], torch.Tensor]


def predict_volume(
    predictor: Predictor,
    volume: np.ndarray,
    context: int,
    roi_size: int,
    overlap: float,
    batch_slices: int = 16,
    sw_batch_size: int = 8,
    views=("axial",),
    mirror_axes=(),
    whole_slab: bool = False,
    box=None,
) -> np.ndarray:
    """Foreground probability ``[K, H, W]`` (float32) of a normalised volume ``[K, H, W]``: the mean
    over ``views`` of the probability predicted slab by slab along each view's axis, each slab
    also mirrored along ``mirror_axes`` (:func:`ctpipe.model.views.mean_over_mirrors`).

    ``whole_slab``: each slab in one pass (:func:`ctpipe.model.views.whole_slab_roi`) instead of
    windows of ``roi_size`` at ``overlap``. ``box``: only this part of the volume is predicted
    (:func:`ctpipe.model.views.lung_roi`), 0 elsewhere."""

    def window_prob(x: np.ndarray) -> np.ndarray:
        if whole_slab:
            logits = whole_slab_logits(predictor, torch.from_numpy(x))
        else:
            logits = sliding_window_inference(
                torch.from_numpy(x),
                (roi_size, roi_size),
                sw_batch_size,
                predictor,
                overlap=overlap,
                mode="gaussian",
            )
        return torch.softmax(logits.float(), dim=1)[:, 1].numpy()

    with torch.inference_mode():
        return mean_over_views(
            volume,
            views,
            lambda seen: slab_by_slab(
                np.ascontiguousarray(seen), context, batch_slices, mirror_axes, window_prob
            ),
            box,
        )


def predict(
    predictor: Predictor,
    volume: np.ndarray,
    context: int,
    inference: Inference,
    box=None,
    mirror: bool = True,
) -> np.ndarray:
    """:func:`predict_volume` as the ``inference`` params say: whole slabs or windows, the views,
    and the mirrored passes of ``mirror_axes`` unless ``mirror`` is false (one pass per view)."""
    return predict_volume(
        predictor,
        volume,
        context,
        inference.roi_size,
        inference.overlap,
        views=inference.views,
        mirror_axes=inference.mirror_axes if mirror else (),
        whole_slab=inference.whole_slab,
        box=box,
    )


def whole_slab_logits(predictor: Predictor, x: torch.Tensor) -> torch.Tensor:
    """Logits ``[n, classes, H, W]`` of slabs ``x [n, C, H, W]`` in one pass of the whole batch:
    zero-padded to :func:`ctpipe.model.views.whole_slab_roi` (half before, half after, as
    ``sliding_window_inference`` pads a window larger than its input) and cropped back.

    This is ``sliding_window_inference`` with that single window, without its bookkeeping (a
    Gaussian weight multiplied in and divided out, an output buffer, batches of windows), which
    cost a fifth of the network's time on the CPU.
    """
    h, w = x.shape[2:]
    rows, cols = whole_slab_roi(h, w)
    ph, pw = rows - h, cols - w
    padded = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return predictor(padded)[:, :, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]


def torch_predictor(net: torch.nn.Module, device: str = "cpu") -> Predictor:
    """Wrap a PyTorch module as a predictor returning CPU logits. Puts ``net`` in eval mode, on
    ``device``, in :data:`ctpipe.model.nets.MEMORY_FORMAT` (in place)."""
    net.eval().to(device=device, memory_format=MEMORY_FORMAT)

    def run(x: torch.Tensor) -> torch.Tensor:
        return net(x.to(device=device, memory_format=MEMORY_FORMAT)).float().cpu()

    return run


def onnx_predictor(session) -> Predictor:
    """Wrap an ``onnxruntime.InferenceSession`` (one input, first output = logits)."""
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy().astype(np.float32)})[0])

    return run
