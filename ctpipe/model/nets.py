"""The segmentation network: a MONAI BasicUNet on 2.5D slabs (adjacent slices as channels).

Why 2.5D: a 2D network that sees ``2 * context_slices + 1`` neighbouring slices trains within
minutes on two CPU cores and gives ONNX Runtime a graph it quantizes well: Conv + BatchNorm
(folded) + ReLU and bilinear up-sampling (``upsample="nontrainable"``), no ConvTranspose, which
has no quantized CPU kernel. A few axial slices are not enough to tell a nodule from a vessel that
crosses the axial plane, so the same network is also trained on and applied to coronal and
sagittal slabs (``train.views``, ``inference.views``; :mod:`ctpipe.model.views`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import BasicUNet

NUM_CLASSES = 2  # background, nodule
# Where PyTorch runs the network (train, validation, evaluate), modules and inputs use channels-last
# (NHWC) memory: oneDNN on the CPU and cuDNN convolve it faster than NCHW. Measured for this
# network on 2 CPU cores: a training step 95 -> 69 ms (batch 16 x 3 x 64 x 64), inference
# 68 -> 54 ms (8 x 3 x 128 x 128); outputs agree to 1e-7. ONNX export is unaffected (the graph has no
# memory format; ONNX Runtime picks its own layout).
MEMORY_FORMAT = torch.channels_last


def slab_channels(context_slices: int) -> int:
    """Input channels of a slab: the centre slice plus ``context_slices`` on each side."""
    return 2 * context_slices + 1


def basic_unet(context_slices: int, features: Sequence[int]) -> torch.nn.Module:
    """The BasicUNet of ``train.context_slices`` and ``train.features`` (channels per level)."""
    return BasicUNet(
        spatial_dims=2,
        in_channels=slab_channels(context_slices),
        out_channels=NUM_CLASSES,
        features=tuple(features),
        act=("relu", {"inplace": True}),
        norm=("batch", {}),
        dropout=0.0,
        upsample="nontrainable",
    )


def in_channels(train_params: Mapping[str, Any]) -> int:
    """:func:`slab_channels` of a checkpoint's ``train_params`` (the train section it was trained
    with, as a dict)."""
    return slab_channels(int(train_params["context_slices"]))


def build_network(train_params: Mapping[str, Any]) -> torch.nn.Module:
    """:func:`basic_unet` of a checkpoint's ``train_params`` (``context_slices``, ``features``)."""
    return basic_unet(
        int(train_params["context_slices"]), [int(f) for f in train_params["features"]]
    )


def load_checkpoint(path: str, map_location: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the network from a checkpoint written by the train stage; return it in eval mode.

    The checkpoint holds ``state_dict``, ``train_params`` (the resolved ``train`` section) and
    ``plan`` (the preprocessing plan), so a model file alone says how to feed it.
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    net = build_network(ckpt["train_params"])
    net.load_state_dict(ckpt["state_dict"])
    net.eval()
    return net, ckpt
