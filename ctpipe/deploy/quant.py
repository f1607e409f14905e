"""ONNX Runtime static INT8 quantization (QDQ, per-channel weights), calibration, configuration
selection and latency measurement.

The fp32 model goes through ``quant_pre_process`` once (ORT graph optimisation and shape
inference; symbolic shape inference is skipped, it does not follow the dynamo export's
``16*h`` dims), then ``quantize_static`` for each configuration of the sweep: a scheme
(activation / weight integer types) and a calibration method. Calibration slabs are real 2.5D
patches drawn, seeded, from the training split only (:func:`ctpipe.deploy.parity.sample_slabs`).

Schemes: ``S8S8`` (int8 activations and weights, what ORT recommends first) and ``U8S8`` (uint8
activations). On x86 with VNNI the U8S8 QLinearConv kernels are the fast ones; ORT keeps some
S8S8 convolutions in fp32 behind transposes, so S8S8 can be slower than fp32 on such a CPU.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quantize_static,
    save_tensors_data,
)
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from onnxruntime.quantization.shape_inference import quant_pre_process

from ctpipe.deploy.onnx_export import INPUT_NAME

log = logging.getLogger(__name__)

SCHEMES = {
    "S8S8": (QuantType.QInt8, QuantType.QInt8),
    "U8S8": (QuantType.QUInt8, QuantType.QInt8),
}
# What quantize_static quantizes by default, so the ranges cover every tensor it will need.
CALIBRATED_OPS = sorted(set(QDQRegistry) | set(QLinearOpsRegistry))
METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
PERCENTILE = 99.999  # percentile calibration: the range covers this percentile of |activations|
# Entropy calibration: histogram bins, more than the 128 quantized bins (2048 is finer but ~30 s
# slower on the pipeline's model).
ENTROPY_BINS = 512


class SlabReader(CalibrationDataReader):
    """Feeds calibration batches ``[B, 2c+1, H, W]`` (float32) to ORT's calibrator."""

    def __init__(self, batches: Sequence[np.ndarray], input_name: str = INPUT_NAME) -> None:
        self.batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
        self.input_name = input_name
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)


def prepare(fp32_path: str | Path, out_path: str | Path) -> Path:
    """``quant_pre_process`` (ORT optimisation + ONNX shape inference) ahead of quantization."""
    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return Path(out_path)


def calibrate(
    prepared: str | Path,
    batches: Sequence[np.ndarray],
    method: str,
    ranges_path: str | Path,
    percentile: float = PERCENTILE,
    entropy_bins: int = ENTROPY_BINS,
) -> Path:
    """Activation ranges of ``prepared`` on ``batches``, saved as an ORT calibration cache (JSON).

    Calibrating here rather than inside ``quantize_static`` serves two ends: one calibration per
    method serves every scheme, and the entropy calibrator gets a histogram finer than its
    quantized bins (ORT's defaults are 128 and 128, which leaves a single candidate threshold, the
    full range, so "entropy" silently equals MinMax).
    """
    if method not in METHODS:
        raise ValueError(
            f"quantize: unknown calibration method {method!r} (valid: {sorted(METHODS)})"
        )
    extra: dict[str, Any] = {}
    if method == "percentile":
        extra["percentile"] = percentile
    elif method == "entropy":
        extra["num_bins"] = entropy_bins
    with tempfile.TemporaryDirectory(prefix="ctpipe.calib.") as tmp:
        calibrator = create_calibrator(
            Path(prepared),
            CALIBRATED_OPS,
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=METHODS[method],
            extra_options=extra,
        )
        calibrator.collect_data(SlabReader(batches))
        save_tensors_data(calibrator.compute_data(), ranges_path)
    return Path(ranges_path)


def quantize(
    prepared: str | Path,
    out_path: str | Path,
    ranges_path: str | Path,
    scheme: str,
    method: str,
    per_channel: bool = True,
) -> Path:
    """Static QDQ quantization of ``prepared`` with the ranges of :func:`calibrate`.

    Raises:
        ValueError: an unknown scheme or calibration method (naming the valid ones).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: unknown scheme {scheme!r} (valid: {sorted(SCHEMES)})")
    if method not in METHODS:
        raise ValueError(
            f"quantize: unknown calibration method {method!r} (valid: {sorted(METHODS)})"
        )
    activation, weight = SCHEMES[scheme]
    quantize_static(
        str(prepared),
        str(out_path),
        None,  # the ranges come from the calibration cache
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=activation,
        weight_type=weight,
        calibrate_method=METHODS[method],
        calibration_cache_path=str(ranges_path),
        # Weights symmetric (int8 around 0); activations asymmetric, ReLU outputs are >= 0.
        extra_options={"WeightSymmetric": True},
    )
    return Path(out_path)


def select(configs: list[dict[str, Any]], max_drop: float, rule: str) -> dict[str, Any] | None:
    """The configuration the accuracy gate admits and ``rule`` prefers, or None if none passes.

    ``fastest``: the lowest latency among those within ``max_drop``; ``accurate``: the highest
    Dice. Ties go to the other criterion.
    """
    passing = [c for c in configs if c["dice_drop"] <= max_drop]
    if not passing:
        return None
    if rule == "fastest":
        return min(passing, key=lambda c: (c["latency_ms"], -c["dice"]))
    if rule == "accurate":
        return min(passing, key=lambda c: (-c["dice"], c["latency_ms"]))
    raise ValueError(f"quantize.selection: unknown rule {rule!r} (fastest, accurate)")


def latency_ms(run: Callable[[], Any], warmup: int, runs: int) -> dict[str, float]:
    """Wall-clock milliseconds of ``run()``: median and 90th percentile after ``warmup`` calls."""
    return rotated_latency_ms({"run": run}, warmup, runs, rounds=1)["run"]


def rotated_latency_ms(
    runs: dict[str, Callable[[], Any]], warmup: int, repeats: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Median and p90 milliseconds of several callables, timed in blocks taken in turn.

    Each of ``rounds`` rounds gives every callable ``warmup`` untimed calls, then
    ``repeats / rounds`` timed ones. Rotating blocks spreads slow changes in the load of a
    shared CPU over all candidates alike; blocks rather than alternating single calls, because
    the thread pools of ORT and PyTorch keep spinning for a while after a call and would slow
    whichever candidate comes next.
    """
    per_round = max(int(repeats) // max(int(rounds), 1), 1)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(max(int(rounds), 1)):
        for name, run in runs.items():
            for _ in range(int(warmup)):
                run()
            for _ in range(per_round):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {
            "median_ms": float(np.median(t)),
            "p90_ms": float(np.percentile(t, 90)),
            "runs": len(t),
        }
        for name, t in times.items()
    }
