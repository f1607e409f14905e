"""Where the network runs for whole-volume scoring: PyTorch or ONNX Runtime, one case at a time.

Shared by the stages that predict whole validation or test volumes (postprocess, evaluate) and by
the benchmarks, so that the post-processing chosen on validation and the figures reported on test
come from the same inference. ONNX Runtime runs the fp32 graph the train stage exported
(``models/model.onnx``): one export per pipeline run, the one quantize and export read too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ctpipe.config import Inference
from ctpipe.deploy import sessions
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
    net: torch.nn.Module, runtime: str, onnx_path: str | Path | None
) -> infer.Predictor:
    """The network as a predictor on ``runtime`` (:func:`resolve_runtime`): ``net`` in PyTorch
    (CUDA when present), or ``onnx_path`` (``models/model.onnx``, the fp32 export of the same
    weights) in ONNX Runtime on the CPU.

    Raises:
        FileNotFoundError: ONNX Runtime was chosen and ``onnx_path`` is not a file.
    """
    runtime = resolve_runtime(runtime)
    if runtime == "torch":
        return infer.torch_predictor(net, "cuda" if torch.cuda.is_available() else "cpu")
    if onnx_path is None or not Path(onnx_path).is_file():
        raise FileNotFoundError(f"{onnx_path}: no ONNX model (the train stage writes it)")
    return infer.onnx_predictor(sessions.ort_session(onnx_path))


def predict_cases(
    net: torch.nn.Module,
    processed: Path,
    cases: list[dict],
    inference: Inference,
    context: int,
    onnx_path: str | Path,
    desc: str = "predict",
) -> Iterator[tuple[dict, np.ndarray, np.ndarray, np.ndarray, object]]:
    """Yield ``(case, image, truth, prob, geometry)`` for each case, one volume in memory at a time,
    inferred on ``inference.runtime`` (:func:`make_predictor`: ``net``, or ``onnx_path``, train's
    ``models/model.onnx``) with the slabs, views and test-time mirroring of ``inference``, inside
    the lungs' box (``inference.lung_margin_mm``)."""
    plan = data.load_plan(processed)
    predictor = make_predictor(net, inference.runtime, onnx_path)
    for case in progress(cases, desc=desc, unit="case"):
        # The volumes live in _predict_case's frame, not here: this generator holds none of a
        # case once the caller has dropped it, so the next case is predicted with one in memory.
        yield (case, *_predict_case(predictor, processed, plan, case, inference, context))


def _predict_case(
    predictor: infer.Predictor,
    processed: Path,
    plan: dict,
    case: dict,
    inference: Inference,
    context: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, object]:
    """``(image, truth, prob, geometry)`` of one case (:func:`predict_cases`)."""
    image, label, geom = data.load_case(processed, case["case_id"])
    image = np.asarray(image, dtype=np.float32)
    box = views.lung_roi(image, plan, geom.spacing[::-1], inference.lung_margin_mm)
    prob = infer.predict(predictor, image, context, inference, box)
    return image, np.asarray(label) > 0, prob, geom
