"""Whole-volume inference time: PyTorch eager against ONNX Runtime, and what test-time mirroring costs.

The evaluate stage's inference (``ctpipe.model.infer.predict``: 2.5D slabs, whole or in sliding
windows as ``inference.whole_slab`` says, the views of ``params.yaml``) on real preprocessed volumes,
in one run:
  torch        the PyTorch module in eval mode, channels-last (what evaluate ran before)
  onnxruntime  train's ONNX export of the same weights (fp32, models/model.onnx) run by ONNX
               Runtime on the CPU (``inference.runtime: auto`` without a GPU)
each with one pass per view and with the mirrored passes of ``inference.mirror_axes``. Prints
seconds per volume, the speed-up and the largest probability difference between the runtimes.

    python benchmarks/bench_inference.py [--model models/model.pt] [--onnx models/model.onnx]
        [--data data/processed] [--cases 3]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from ctpipe import config
from ctpipe.deploy.runtime import make_predictor
from ctpipe.model import data, infer, nets

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=ROOT / "models" / "model.pt", help="trained checkpoint"
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT / "data" / "processed", help="preprocessed dataset"
    )
    parser.add_argument("--cases", type=int, default=3, help="test volumes timed")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument(
        "--onnx",
        type=Path,
        default=ROOT / "models" / "model.onnx",
        help="the fp32 ONNX export of --model (train writes it)",
    )
    args = parser.parse_args(argv)
    inference = config.load(args.params).inference
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    net, ckpt = nets.load_checkpoint(str(args.model))
    context = ckpt["train_params"]["context_slices"]
    cases = data.cases_in(data.load_index(args.data), "test")[: args.cases]
    volumes = [np.asarray(data.load_case(args.data, c["case_id"])[0], np.float32) for c in cases]
    window = (
        "whole slab"
        if inference.whole_slab
        else f"ROI {inference.roi_size}, overlap {inference.overlap}"
    )
    print(
        f"{len(volumes)} test volumes {[v.shape for v in volumes]}, views {inference.views}, "
        f"{window}, {torch.get_num_threads()} threads"
    )
    results, probs = {}, {}
    for runtime in ("torch", "onnxruntime"):
        predictor = make_predictor(net, runtime, args.onnx)
        for mirror in (False, True):
            infer.predict(predictor, volumes[0][:4], context, inference, mirror=False)  # warm-up
            start = time.perf_counter()
            out = [infer.predict(predictor, v, context, inference, mirror=mirror) for v in volumes]
            axes = tuple(inference.mirror_axes) if mirror else ()
            results[runtime, axes] = (time.perf_counter() - start) / len(volumes)
            probs[runtime, axes] = out
            print(
                f"  {runtime:12s} mirror_axes {list(axes)!s:8s} {results[runtime, axes]:6.2f} s/volume",
                flush=True,
            )
    for mirror in {m for _, m in results}:
        diff = max(
            float(np.abs(a - b).max())
            for a, b in zip(probs["torch", mirror], probs["onnxruntime", mirror])
        )
        print(
            f"mirror_axes {list(mirror)}: onnxruntime {results['torch', mirror] / results['onnxruntime', mirror]:.2f}x "
            f"faster than torch; max |probability difference| {diff:.1e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
