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
time; the rule is in :mod:`ctpipe.postprocessing.choose`.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import torch

from ctpipe.deploy import runtime
from ctpipe.fileio import rounded, write_csv, write_json
from ctpipe.model import data, nets
from ctpipe.params import add_model_inputs, setup_logging, stage_params, stage_parser
from ctpipe.postprocessing import choose
from ctpipe.runenv import record as record_environment

log = logging.getLogger("postprocess")

TIES = (
    "then pooled Dice, fewer FP per scan, lower values, large-component rule off, larger volume, "
    "higher level"
)
RULES = {
    "dice": "threshold, component_threshold (and keep_level, keep_volume_mm3 with auto): highest mean "
    f"val Dice (cases with nodules), {TIES}; shape_weight: highest val CPM at that threshold, then "
    "the smallest",
    "dice+cpm": "threshold, component_threshold, shape_weight (and keep_level, keep_volume_mm3 with "
    f"auto) together: highest val mean Dice (cases with nodules) + val CPM, {TIES}, smaller weight",
}


def val_cases(model_path: Path, processed: Path, cfg: dict) -> tuple[list[choose.Case], object]:
    """Predict every validation case; return them with the validation nodules."""
    net, ckpt = nets.load_checkpoint(str(model_path))
    cases = data.cases_in(data.load_index(processed), "val")
    if not cases:
        raise ValueError(
            f"{processed}/index.json: the val split is empty; nothing to choose the post-processing on"
        )
    nodules = data.load_nodules(processed)
    nodules = nodules[nodules["seriesuid"].isin([c["seriesuid"] for c in cases])].reset_index(
        drop=True
    )
    out = [
        choose.Case(prob, truth, geom, case["seriesuid"])
        for case, _, truth, prob, geom in runtime.predict_cases(
            net, processed, cases, cfg, int(ckpt["train_params"]["context_slices"]), "validation"
        )
    ]
    return out, nodules


def run(model_path: Path, processed: Path, out: Path, tables: Path, cfg: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    cases, nodules = val_cases(model_path, processed, cfg)
    result = choose.choose(cases, nodules, cfg)
    masks = result["masks"]
    if masks["keep_volume_mm3"].isna().all():  # off (the default): the table as before it existed
        masks = masks.drop(columns=["keep_level", "keep_volume_mm3"])
    write_csv(tables / "sweep.csv", masks.round(4))
    write_csv(tables / "shape.csv", result["shape"].round(4))
    record = {
        "chosen": result["chosen"],
        "chosen_on": "val",
        "fixed_by_params": result["fixed"],
        "objective": cfg["objective"],
        "rule": RULES[cfg["objective"]],
        "val": result["val"],
        "model_sha256_16": _sha(model_path),
    }
    write_json(out, rounded(record))
    chosen = result["chosen"]
    log.info(
        "chosen on %d val cases: threshold %g, component_threshold %g, shape_weight %g, "
        "large components %s (val Dice %.4f, CPM %.4f)",
        result["val"]["cases"],
        chosen["threshold"],
        chosen["component_threshold"],
        chosen["shape_weight"],
        "off"
        if chosen["keep_volume_mm3"] is None
        else f">= {chosen['keep_volume_mm3']:g} mm3 at {chosen['keep_level']:g}",
        result["val"]["dice"],
        result["val"]["cpm"],
    )
    figures = {k: v for k, v in result["chosen"].items() if v is not None}  # no null metric
    return rounded({**figures, **{f"val_{k}": v for k, v in result["val"].items()}})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "postprocess")
    add_model_inputs(parser, postprocessing=False)
    parser.add_argument(
        "out", type=Path, help="chosen post-processing to write (models/postprocessing.json)"
    )
    parser.add_argument(
        "--tables", type=Path, required=True, help="folder for sweep.csv and shape.csv"
    )
    args = parser.parse_args(argv)
    setup_logging()
    cfg, seed = stage_params("postprocess", args.params, shared=("inference",))
    record_environment("postprocess", Path(args.metrics).parent / "env")
    write_json(args.metrics, run(args.model, args.data_dir, args.out, args.tables, cfg, seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
