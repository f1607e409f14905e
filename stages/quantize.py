"""Stage quantize: ONNX Runtime static INT8 quantization of the trained model, gated on accuracy.

In:  ``MODEL`` (models/model.pt, for the PyTorch latency), ``--onnx`` (models/model.onnx, train's
     fp32 export: the graph quantized), ``DATA_DIR`` (data/processed), ``--postprocessing``
     (models/postprocessing.json, chosen on validation), params ``quantize``, ``inference`` (slab
     size, whole slabs or windows, views, lungs' box, smallest candidate; not ``mirror_axes``) and
     ``base.seed``
Out: ``OUT_DIR`` (models/quantized): ``model_int8.onnx`` (QDQ, after ``quant_pre_process``);
     ``metrics/quantize.json`` (figures only); ``metrics/env/quantize.json`` (what it ran on, the
     load average around the timings, what the Dice is pooled over).

Calibration on train slabs, the sweep and the choice on val slabs, the gate on the whole test
volumes, the latencies: :mod:`ctpipe.deploy.int8`. The stage fails (after writing its figures)
when the INT8 test Dice is more than ``quantize.max_dice_drop`` below fp32.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from ctpipe import config
from ctpipe.deploy import int8, onnx_export, sessions
from ctpipe.deploy.int8 import GateError
from ctpipe.fileio import rounded, write_json
from ctpipe.model import nets
from ctpipe.params import add_model_inputs, setup_logging, stage_parser
from ctpipe.postprocessing import choose
from ctpipe.postprocessing.candidates import Chosen
from ctpipe.runenv import record as record_environment

log = logging.getLogger("quantize")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "quantize")
    add_model_inputs(parser, onnx=True)
    parser.add_argument("out_dir", type=Path, help="the INT8 model (models/quantized)")
    args = parser.parse_args(argv)
    setup_logging()
    params = config.load(args.params)
    chosen = choose.load(args.postprocessing)
    result, conditions = run(args.model, args.onnx, args.data_dir, args.out_dir, params, chosen)
    # Metrics first, so a failed gate still leaves the figures to look at.
    write_json(args.metrics, result)
    record_environment("quantize", Path(args.metrics).parent / "env", conditions)
    log.info(
        "quantize: %s_%s Dice fp32 %.4f int8 %.4f (drop %.4f), %.1f ms -> %.1f ms (x%.2f, int8 faster: %s)",
        result["chosen"]["scheme"],
        result["chosen"]["method"],
        result["dice_fp32"],
        result["dice_int8"],
        result["dice_drop"],
        result["latency_ms_fp32"],
        result["latency_ms_int8"],
        result["speedup_int8_vs_fp32"],
        result["int8_faster"],
    )
    if not result["gate_passed"]:
        raise GateError(
            f"quantize: INT8 test Dice {result['dice_int8']:.4f} is {result['dice_drop']:.4f} below "
            f"fp32 {result['dice_fp32']:.4f}, more than quantize.max_dice_drop={result['max_dice_drop']}"
            f" (figures in {args.metrics})"
        )
    return 0


def run(
    model_path: Path,
    fp32: Path,
    processed: Path,
    out_dir: Path,
    params: config.Params,
    chosen: Chosen,
) -> tuple[dict, dict]:
    """Choose, write and measure ``out_dir/model_int8.onnx``; return the figures (rounded) and the
    conditions they were measured under."""
    start = time.perf_counter()
    quantize, inference = params.quantize, params.inference
    opset = onnx_export.check_opset(fp32)
    threads = sessions.resolve_threads(quantize.threads)
    torch.set_num_threads(threads)
    net, ckpt = nets.load_checkpoint(str(model_path))
    context = ckpt["train_params"]["context_slices"]
    out_dir.mkdir(parents=True, exist_ok=True)
    model_int8 = out_dir / "model_int8.onnx"
    phases = {}

    def lap(name: str) -> None:
        phases[name] = time.perf_counter() - start - sum(phases.values())

    slabs = int8.sample_slabs(processed, context, quantize, inference.roi_size, params.base.seed)
    result = int8.choose_int8(fp32, model_int8, slabs, quantize, chosen.threshold)
    lap("sweep")
    result.update(
        int8.measure_test_split(fp32, model_int8, processed, context, inference, chosen, quantize)
    )
    lap("test")
    lat = int8.latencies(net, fp32, model_int8, slabs.latency, threads)
    lap("latency")
    result.update(int8.latency_figures(lat, slabs.latency))
    size_fp32, size_int8 = fp32.stat().st_size, model_int8.stat().st_size
    result.update(
        {
            "size_bytes_fp32": size_fp32,
            "size_bytes_int8": size_int8,
            "size_ratio": size_int8 / size_fp32,
            "threads": threads,
            "opset": opset,
            "seconds": time.perf_counter() - start,
            "seconds_by_phase": phases,
        }
    )
    conditions = {
        "latency_load_average_1min": lat["load_average_1min"],
        "dice_definition": int8.dice_definition(result["test_cases"], chosen),
    }
    return rounded(result), rounded(conditions)


if __name__ == "__main__":
    sys.exit(main())
