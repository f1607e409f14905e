"""The segmentation network: a MONAI BasicUNet on 2.5D slabs (adjacent slices as channels).

Why 2.5D: a 2D network that sees ``2 * context_slices + 1`` neighbouring slices trains within
minutes on two CPU cores and gives ONNX Runtime a graph it quantizes well: Conv + BatchNorm
(folded) + ReLU and bilinear up-sampling (``upsample="nontrainable"``), no ConvTranspose, which
has no quantized CPU kernel. A few axial slices are not enough to tell a nodule from a vessel that
crosses the axial plane, so the same network is also trained on and applied to coronal and
sagittal slabs (``train.views``, ``inference.views``; :mod:`ctpipe.model.views`).
"""

from __future__ import annotations

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


def in_channels(cfg: dict[str, Any]) -> int:
    """Number of input channels: the centre slice plus ``context_slices`` on each side."""
    return 2 * int(cfg["context_slices"]) + 1


def build_network(cfg: dict[str, Any]) -> torch.nn.Module:
    """Build the network described by the ``train`` params (``context_slices``, ``features``)."""
    return BasicUNet(
        spatial_dims=2,
        in_channels=in_channels(cfg),
        out_channels=NUM_CLASSES,
        features=tuple(int(f) for f in cfg["features"]),
        act=("relu", {"inplace": True}),
        norm=("batch", {}),
        dropout=0.0,
        upsample="nontrainable",
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
