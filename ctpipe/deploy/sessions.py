"""ONNX Runtime CPU sessions with a fixed thread count and optimisation level."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ctpipe.runenv import available_cpus

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def resolve_threads(threads: int) -> int:
    """``threads`` if positive, else every CPU this process may use."""
    return int(threads) if int(threads) > 0 else available_cpus()


def ort_session(
    path: str | Path, threads: int = 0, optimization: str = "all"
) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` with a fixed intra-op thread count and optimisation level.

    ``all`` matters on CPU: it adds the NCHWc layout for fp32 convolutions and the NHWC int8
    kernels (QLinearConv, QLinearConcat) that make a QDQ model faster than fp32.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPT_LEVELS[optimization]
    options.log_severity_level = 3  # ORT warns about removed initializers on every load
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
