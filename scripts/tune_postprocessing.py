"""Choose the post-processing (``inference.threshold``, ``inference.component_threshold``,
``inference.shape_weight``) on the VALIDATION split, as nnU-Net chooses its post-processing on
validation predictions.

The model predicts every validation volume once (the inference params of ``params.yaml``: ROI,
overlap, views, mirroring). Then every pair of a voxel threshold and a component threshold is
scored by the figure evaluate reports, the Dice averaged over the validation cases with nodules,
and by the lesion operating point (sensitivity, false positives per scan); and every candidate
shape weight by the validation CPM of the FROC it ranks (ties: the smallest weight, the least
departure from the peak probability). The test split is not read. Prints the tables and the
choices; copy them into ``params.yaml`` by hand (a decision that belongs in git, next to the model
it was made for).

Usage::

    python scripts/tune_postprocessing.py models/model.pt data/processed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctpipe import data, detect, metrics, nets, quant  # noqa: E402
from ctpipe.params import stage_params  # noqa: E402
from stages.evaluate import predict_cases  # noqa: E402


def sweep(probs: list[np.ndarray], truths: list[np.ndarray], cands: pd.DataFrame, nodules: pd.DataFrame,
          thresholds: list[float], component_thresholds: list[float]) -> pd.DataFrame:
    """One row per pair: case-mean Dice (cases with nodules), pooled Dice, operating point."""
    rows = []
    for t in thresholds:
        for h in component_thresholds:
            masks = [detect.segment(p, t, h) for p in probs]
            per_case = [quant.pooled_dice([m], [g]) for m, g in zip(masks, truths) if g.any()]
            op = metrics.froc(cands[detect.at_operating_point(cands, t, h)], nodules, len(probs))
            rows.append({"threshold": t, "component_threshold": h, "dice": float(np.mean(per_case)),
                         "dice_pooled": quant.pooled_dice(masks, truths),
                         "sensitivity": op["sensitivity"], "fp_per_scan": op["fp_per_scan"]})
    return pd.DataFrame(rows)


def sweep_shape(cands: pd.DataFrame, nodules: pd.DataFrame, n_scans: int, weights: list[float]) -> pd.DataFrame:
    """One row per shape weight: CPM and sensitivities of the FROC the weighted score ranks."""
    rows = []
    for w in weights:
        froc = metrics.froc(cands.assign(score=detect.shape_score(cands["peak"], cands["elongation"], w)),
                            nodules, n_scans)
        rows.append({"shape_weight": w, "cpm": froc["cpm"],
                     **{f"sens@{rate:g}": value for rate, value in froc["sensitivity_at"].items()}})
    return pd.DataFrame(rows)


def best_shape_weight(table: pd.DataFrame) -> float:
    """The weight of the highest CPM; among equal CPMs, the smallest weight."""
    return float(table.sort_values(["cpm", "shape_weight"], ascending=[False, True]).iloc[0]["shape_weight"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="trained model (models/model.pt)")
    parser.add_argument("data_dir", type=Path, help="preprocessed dataset (data/processed)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--component-thresholds", type=float, nargs="+",
                        default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--shape-weights", type=float, nargs="+", default=[0, 0.5, 1, 2, 3, 4, 6, 8])
    args = parser.parse_args(argv)
    cfg, _ = stage_params("evaluate", args.params, shared=("inference",))
    net, ckpt = nets.load_checkpoint(str(args.model))
    cases = data.cases_in(data.load_index(args.data_dir), "val")
    if not cases:
        raise SystemExit(f"{args.data_dir}/index.json: the val split is empty")
    nodules = data.load_nodules(args.data_dir)
    nodules = nodules[nodules["seriesuid"].isin([c["seriesuid"] for c in cases])].reset_index(drop=True)
    probs, truths, cands = [], [], []
    # The same inference as the evaluate stage, on the validation split.
    for case, _, truth, prob, geom in predict_cases(net, args.data_dir, cases, cfg,
                                                    int(ckpt["train_params"]["context_slices"]), "validation"):
        probs.append(prob)
        truths.append(truth)
        cands.append(detect.candidates_from_probability(prob, geom, float(cfg["candidate_threshold"]),
                                                        float(cfg["min_candidate_mm3"]))
                     .assign(seriesuid=case["seriesuid"]))
    cands = pd.concat(cands, ignore_index=True)
    table = sweep(probs, truths, cands, nodules, args.thresholds, args.component_thresholds)
    print(f"validation: {len(cases)} cases, {sum(g.any() for g in truths)} with nodules, {len(nodules)} nodules")
    print(table.round(4).to_string(index=False))
    best = table.sort_values(["dice", "dice_pooled"], ascending=False).iloc[0]
    print(f"best: inference.threshold {best['threshold']:g}, inference.component_threshold "
          f"{best['component_threshold']:g} (val Dice {best['dice']:.4f}; now "
          f"{cfg['threshold']:g} / {cfg['component_threshold']:g})")
    shapes = sweep_shape(cands, nodules, len(cases), args.shape_weights)
    print(shapes.round(4).to_string(index=False))
    weight = best_shape_weight(shapes)
    cpm = shapes.set_index("shape_weight").loc[weight, "cpm"]
    print(f"best: inference.shape_weight {weight:g} (val CPM {cpm:.4f}; now {cfg['shape_weight']:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
