"""Where the network runs for whole-volume scoring: PyTorch or ONNX Runtime, one case at a time.

Shared by the stages that predict whole validation or test volumes (postprocess, evaluate) and by
the benchmarks, so that the post-processing chosen on validation and the figures reported on test
come from the same inference.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ctpipe import config
from ctpipe.deploy import onnx_export, sessions
from ctpipe.model import data, infer, views
from ctpipe.progress import progress

RUNTIMES = ("auto", "torch", "onnxruntime")


def resolve_runtime(runtime: str) -> str:
    """``auto``: PyTorch on a CUDA GPU when there is one, else ONNX Runtime (on CPU it runs this
    network about 1.6x faster than PyTorch eager, and it is the runtime the exported package uses)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"inference.runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        return "torch" if torch.cuda.is_available() else "onnxruntime"
    return runtime


def make_predictor(
    net: torch.nn.Module, channels: int, runtime: str, workdir: Path
) -> infer.Predictor:
    """The network as a predictor on ``runtime`` (:func:`resolve_runtime`): PyTorch (CUDA when
    present), or ONNX Runtime on CPU through an fp32 ONNX export written to ``workdir``."""
    runtime = resolve_runtime(runtime)
    if runtime == "torch":
        return infer.torch_predictor(net, "cuda" if torch.cuda.is_available() else "cpu")
    path = workdir / "model.onnx"
    onnx_export.export_onnx(net, channels, path, onnx_export.OPSET)
    return infer.onnx_predictor(sessions.ort_session(path))


def predict_cases(
    net,
    processed: Path,
    cases: list[dict],
    cfg: config.Inference,
    context: int,
    desc: str = "predict",
) -> Iterator[tuple[dict, np.ndarray, np.ndarray, np.ndarray, object]]:
    """Yield ``(case, image, truth, prob, geometry)`` for each case, one volume in memory at a time,
    inferred on ``cfg.runtime`` with the ROI, overlap, views and test-time mirroring of ``cfg``
    (the ``inference`` params), inside the lungs' box (``lung_margin_mm``)."""
    plan = data.load_plan(processed)
    with tempfile.TemporaryDirectory(prefix="ctpipe-predict-") as tmp:
        predictor = make_predictor(net, 2 * context + 1, cfg.runtime, Path(tmp))
        for case in progress(cases, desc=desc, unit="case"):
            image, label, geom = data.load_case(processed, case["case_id"])
            image = np.asarray(image, dtype=np.float32)
            box = views.lung_roi(image, plan, geom.spacing[::-1], cfg.lung_margin_mm)
            prob = infer.predict_volume(
                predictor,
                image,
                context,
                cfg.roi_size,
                cfg.overlap,
                views=cfg.views,
                mirror_axes=cfg.mirror_axes,
                whole_slab=cfg.whole_slab,
                box=box,
            )
            yield case, image, np.asarray(label) > 0, prob, geom
