"""Stage export: the deployable, verified model package.

In:  ``MODEL`` (models/model.pt), ``--onnx`` (models/model.onnx, train's fp32 export),
     ``DATA_DIR`` (data/processed), ``QUANT_DIR`` (models/quantized, for ``model_int8.onnx``),
     ``--postprocessing`` (models/postprocessing.json, the post-processing chosen on validation,
     written into ``input_spec.json``), params ``export``, ``inference`` and ``base.seed``; read if
     present, for the model card: ``--evaluate-metrics`` (metrics/evaluate.json),
     ``--quantize-metrics`` (metrics/quantize.json) and ``--quantize-env`` (metrics/env/quantize.json).
Out: ``OUT_DIR`` (models/export): ``model.onnx`` (train's export, opset checked), ``model_int8.onnx``,
     ``model.pt2`` (``torch.export``), ``input_spec.json``, ``MODEL_CARD.md``, ``versions.json``,
     ``verification.json``, ``triton/<name>/config.pbtxt`` + ``triton/<name>/1/model.onnx``,
     ``SHA256SUMS`` over every other file; with ``--classifier`` (models/classifier.pt) also
     ``classifier.onnx``, which ``predict`` runs on each nodule (checked against PyTorch with
     ``export.atol`` on probabilities); ``metrics/export.json``.

Gate: the opset and ``onnx.checker`` (full check), then ONNX Runtime and the reloaded ``.pt2``
against PyTorch on real validation slabs: max |logit difference| <= ``export.atol`` and Dice of the
thresholded predictions >= ``export.min_dice``; otherwise the stage fails with the figures. The
package is built in a temporary folder and moved into place only when everything passed
(:mod:`ctpipe.deploy.build`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ctpipe import config
from ctpipe.deploy import build, onnx_export
from ctpipe.fileio import read_json, write_json
from ctpipe.params import add_model_inputs, setup_logging, stage_parser
from ctpipe.postprocessing import choose
from ctpipe.runenv import record as record_environment

log = logging.getLogger("export")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    onnx_export.quiet_exporter_logs()
    params = config.load(args.params)
    inputs = build.Inputs(
        model=args.model,
        onnx=args.onnx,
        processed=args.data_dir,
        quant_dir=args.quant_dir,
        chosen=choose.load(args.postprocessing),
        evaluation=read_optional(args.evaluate_metrics),
        quantized=read_optional(args.quantize_metrics),
        quantize_env=read_optional(args.quantize_env),
        classifier=args.classifier,
        malignancy=args.malignancy,
    )
    record_environment("export", Path(args.metrics).parent / "env")
    result = build.export_package(
        inputs, args.out_dir, params.export, params.inference, params.base.seed
    )
    write_json(args.metrics, result)
    log.info(
        "export: %s verified (ONNX max |diff| %.2e, Dice %.5f; pt2 max |diff| %.2e) in %.1f s",
        args.out_dir,
        result["onnx_max_abs_diff"],
        result["onnx_dice"],
        result["pt2_max_abs_diff"],
        result["total_seconds"],
    )
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(__doc__, "export")
    add_model_inputs(parser, onnx=True)
    parser.add_argument("quant_dir", type=Path, help="quantize stage output (models/quantized)")
    parser.add_argument("out_dir", type=Path, help="the package (models/export)")
    for name, source in (
        ("evaluate-metrics", "test figures (dvc.yaml: metrics/evaluate.json)"),
        ("quantize-metrics", "INT8 figures (dvc.yaml: metrics/quantize.json)"),
        ("quantize-env", "the CPU of the INT8 latencies (dvc.yaml: metrics/env/quantize.json)"),
    ):
        parser.add_argument(f"--{name}", type=Path, default=None, help=f"model card: {source}")
    parser.add_argument(
        "--classifier",
        type=Path,
        default=None,
        help="candidate classifier (models/classifier.pt): exported as classifier.onnx",
    )
    parser.add_argument(
        "--malignancy",
        type=Path,
        default=None,
        help="malignancy model (models/malignancy.json): into input_spec.json's 'malignancy'",
    )
    return parser.parse_args(argv)


def read_optional(path: Path | None) -> dict | None:
    return read_json(path) if path is not None and path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())
