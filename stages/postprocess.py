"""Stage postprocess: choose the post-processing of the trained model on the VALIDATION split.

In:  ``MODEL`` (models/model.pt), ``DATA_DIR`` (data/processed), params ``postprocess`` (fixed values
     or ``auto`` with search grids) and ``inference`` (ROI, overlap, views, mirroring, runtime,
     smallest candidate). Only the validation cases are read; the test split plays no part.
Out: ``OUT`` (models/postprocessing.json): the chosen ``threshold``, ``component_threshold`` and
     ``shape_weight`` with the rule and the validation figures at the choice, read by evaluate,
     quantize and export; ``TABLES_DIR`` (metrics/postprocess): ``sweep.csv`` (every pair of
     thresholds: val Dice, pooled Dice, sensitivity, FP per scan) and ``shape.csv`` (every shape
     weight: val CPM and sensitivities); ``metrics/postprocess.json`` (the choice and its val figures).

The validation volumes are predicted with the same inference as evaluate (views, mirroring), one at a
time, and each is reduced to the tables the choice needs before the next is predicted, so memory
does not grow with the number of validation cases; the rule is in
:mod:`ctpipe.postprocessing.choose`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from ctpipe import config
from ctpipe.deploy import runtime
from ctpipe.fileio import rounded, write_csv, write_json
from ctpipe.model import data, nets
from ctpipe.params import add_model_inputs, setup_logging, stage_parser
from ctpipe.postprocessing import choose
from ctpipe.runenv import record as record_environment

log = logging.getLogger("postprocess")

RULE = (
    "threshold, component_threshold, shape_weight together: highest val mean Dice (cases with "
    "nodules) + val CPM, then pooled Dice, fewer FP per scan, lower values, smaller weight"
)


def val_cases(
    model_path: Path, onnx_path: Path, processed: Path, inference: config.Inference
) -> tuple[Iterator[choose.Case], pd.DataFrame]:
    """The validation cases, each predicted when the choice asks for it (an iterator, so that one
    volume is in memory at a time), and the validation nodules."""
    net, ckpt = nets.load_checkpoint(str(model_path))
    cases, nodules = data.split_cases(processed, "val")
    context = ckpt["train_params"]["context_slices"]
    predicted = runtime.predict_cases(
        net, processed, cases, inference, context, onnx_path, "validation"
    )
    # map, unlike a generator expression, keeps no reference to the case it last produced
    return map(_as_case, predicted), nodules


def _as_case(predicted: tuple) -> choose.Case:
    case, _, truth, prob, geom = predicted
    return choose.Case(prob, truth, geom, case["seriesuid"])


def run(
    model_path: Path,
    onnx_path: Path,
    processed: Path,
    out: Path,
    tables: Path,
    post: config.Postprocess,
    inference: config.Inference,
) -> dict:
    cases, nodules = val_cases(model_path, onnx_path, processed, inference)
    result = choose.choose(cases, nodules, post, inference.min_candidate_mm3)
    write_csv(tables / "sweep.csv", result["masks"].round(4))
    write_csv(tables / "shape.csv", result["shape"].round(4))
    chosen = dataclasses.asdict(result["chosen"])
    record = {
        "chosen": chosen,
        "chosen_on": "val",
        "fixed_by_params": result["fixed"],
        "rule": RULE,
        "val": result["val"],
        "model_sha256_16": _sha(model_path),
    }
    write_json(out, rounded(record))
    log.info(
        "chosen on %d val cases: threshold %g, component_threshold %g, shape_weight %g "
        "(val Dice %.4f, CPM %.4f)",
        result["val"]["cases"],
        *chosen.values(),
        result["val"]["dice"],
        result["val"]["cpm"],
    )
    return rounded({**chosen, **{f"val_{k}": v for k, v in result["val"].items()}})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "postprocess")
    add_model_inputs(parser, postprocessing=False, onnx=True)
    parser.add_argument(
        "out", type=Path, help="chosen post-processing to write (models/postprocessing.json)"
    )
    parser.add_argument(
        "--tables", type=Path, required=True, help="folder for sweep.csv and shape.csv"
    )
    args = parser.parse_args(argv)
    setup_logging()
    params = config.load(args.params)
    record_environment("postprocess", Path(args.metrics).parent / "env")
    metrics = run(
        args.model,
        args.onnx,
        args.data_dir,
        args.out,
        args.tables,
        params.postprocess,
        params.inference,
    )
    write_json(args.metrics, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
