"""Stage candidates: the segmentation's candidates of the train and val splits, to be classified.

In:  ``MODEL`` (models/model.pt, run as ``--onnx`` models/model.onnx), ``DATA_DIR``
     (data/processed), ``--postprocessing`` (models/postprocessing.json: the threshold and shape
     weight that define a candidate), params ``candidates`` and ``inference``.
Out: ``OUT_DIR`` (data/candidates): per split ``<split>.csv`` (one row per crop: ``seriesuid``,
     ``case_id``, ``coordX/Y/Z`` (world mm), the candidate's ``seg_score``, ``peak``,
     ``elongation``, ``volume_mm3``, ``diameter_mm``, ``nodule_index`` (the nodule it hits, -1:
     none), ``label`` (1: it hits a nodule), ``source``), ``summary.json`` (the crop: side
     ``candidates.crop_mm``, its shape on the plan's grid; the counts); ``metrics/candidates.json``.

The crops themselves are not stored: a crop is a function of ``data/processed``, the centre and
the crop size (:func:`ctpipe.classifier.cut_crops`), and the classify stage cuts them from there,
so the candidates add kilobytes to the disk, not a copy of every lung around them.

A candidate is exactly what evaluate and predict call one (:func:`ctpipe.postprocessing.candidates.
label_candidates` at the chosen threshold), and it hits a nodule as LUNA16 counts a hit (centre
strictly inside the nodule's radius). The val split is predicted as evaluate predicts test (every
view and mirroring of ``inference``), so that what the classify stage chooses on val holds on test.
The train split is predicted with ``candidates.train_views`` and ``train_mirror_axes`` (faster, and
its many candidates are the classifier's negatives); its nodules are added as rows of their own
(``source: nodule``), so that a nodule the segmentation misses is still a positive, and
:data:`RANDOM_PER_CASE` points of its lungs (``source: random``, seeded by ``base.seed``), so that
a split whose segmentation finds nothing false still has negatives.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ctpipe import classifier, config
from ctpipe.deploy import runtime
from ctpipe.evaluation import luna16
from ctpipe.fileio import rounded, write_csv, write_json
from ctpipe.geometry import array_index_to_world
from ctpipe.model import data, nets, views
from ctpipe.params import add_model_inputs, setup_logging, stage_parser
from ctpipe.postprocessing import choose
from ctpipe.postprocessing.candidates import label_candidates
from ctpipe.runenv import record as record_environment

log = logging.getLogger("candidates")
SPLITS = ("train", "val")
RANDOM_PER_CASE = 8  # train: points drawn in each case's lung box, more negatives (or not: a hit)
COLUMNS = ["seg_score", "peak", "elongation", "volume_mm3", "diameter_mm"]


def mine(
    model_path: Path,
    onnx_path: Path,
    processed: Path,
    split: str,
    chosen,
    inference: config.Inference,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, int]:
    """One split's candidates (and, for train, its nodules and random points); its case count."""
    net, ckpt = nets.load_checkpoint(str(model_path))
    cases, nodules = data.split_cases(processed, split)
    plan = data.load_plan(processed)
    context = ckpt["train_params"]["context_slices"]
    tables = []
    predicted = runtime.predict_cases(
        net, processed, cases, inference, context, onnx_path, f"candidates {split}"
    )
    for case, image, _, prob, geom in predicted:
        _, cands = label_candidates(
            prob, geom, chosen.threshold, inference.min_candidate_mm3, chosen.shape_weight
        )
        cands = cands.drop(columns="label").rename(columns={"score": "seg_score"})
        cands = cands.assign(
            seriesuid=case["seriesuid"], case_id=case["case_id"], source="candidate"
        )
        if split == "train":
            own = _nodule_rows(nodules[nodules["seriesuid"] == case["seriesuid"]], case)
            drawn = _random_rows(image, geom, plan, inference, rng, case)
            cands = pd.concat([cands, own, drawn], ignore_index=True)
        tables.append(cands)
        del image, prob
    table = pd.concat(tables, ignore_index=True)
    matched = luna16.match_candidates(table.assign(score=table["seg_score"].fillna(1.0)), nodules)
    table["nodule_index"] = matched["nodule_index"].to_numpy()
    table["label"] = (table["nodule_index"] >= 0).astype(int)
    return table, len(cases)


def _nodule_rows(nodules: pd.DataFrame, case: dict) -> pd.DataFrame:
    """Each nodule of a case as a crop centre (no segmentation figures)."""
    return _rows(nodules[["coordX", "coordY", "coordZ"]].to_numpy(np.float64), case, "nodule")


def _random_rows(image, geom, plan, inference, rng, case) -> pd.DataFrame:
    """:data:`RANDOM_PER_CASE` points drawn uniformly in the case's lung box (the whole volume
    without one): what the classifier sees of the lungs besides the candidates."""
    box = views.lung_roi(image, plan, geom.spacing[::-1], inference.lung_margin_mm)
    box = box or tuple(slice(0, n) for n in image.shape)
    kji = np.stack(
        [rng.integers(b.start, max(b.stop, b.start + 1), RANDOM_PER_CASE) for b in box], axis=1
    )
    return _rows(array_index_to_world(kji.astype(np.float64), geom).reshape(-1, 3), case, "random")


def _rows(xyz: np.ndarray, case: dict, source: str) -> pd.DataFrame:
    rows = pd.DataFrame(xyz, columns=["coordX", "coordY", "coordZ"])
    for column in COLUMNS:
        rows[column] = np.nan
    return rows.assign(seriesuid=case["seriesuid"], case_id=case["case_id"], source=source)


def run(
    model_path: Path,
    onnx_path: Path,
    processed: Path,
    chosen_path: Path,
    out_dir: Path,
    cfg: config.Candidates,
    inference: config.Inference,
    seed: int,
) -> dict:
    chosen = choose.load(chosen_path)
    rng = np.random.default_rng(seed)
    plan = data.load_plan(processed)
    shape = classifier.crop_shape(plan["target_spacing_mm"], cfg.crop_mm)
    out_dir.mkdir(parents=True, exist_ok=True)
    mining = {
        "train": inference.model_copy(
            update={"views": cfg.train_views, "mirror_axes": cfg.train_mirror_axes}
        ),
        "val": inference,
    }
    summary: dict = {
        "crop_mm": cfg.crop_mm,
        "crop_shape_kji": list(shape),
        "margin": classifier.MARGIN,
        "splits": {},
    }
    for split in SPLITS:
        table, n_cases = mine(model_path, onnx_path, processed, split, chosen, mining[split], rng)
        order = ["seriesuid", "case_id", "coordX", "coordY", "coordZ", *COLUMNS]
        table = table[order + ["nodule_index", "label", "source"]]
        write_csv(out_dir / f"{split}.csv", table.round(6))
        is_cand = table["source"] == "candidate"
        figures = {
            "cases": n_cases,
            "candidates": int(is_cand.sum()),
            "candidates_on_nodules": int(table.loc[is_cand, "label"].sum()),
            "nodule_crops": int((table["source"] == "nodule").sum()),
            "random_crops": int((table["source"] == "random").sum()),
        }
        summary["splits"][split] = figures
        log.info("%s: %s", split, figures)
    write_json(out_dir / "summary.json", summary)
    return rounded(
        {f"{split}_{k}": v for split, f in summary["splits"].items() for k, v in f.items()}
    )


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "candidates")
    add_model_inputs(parser, onnx=True)
    parser.add_argument("out_dir", type=Path, help="candidate tables (data/candidates)")
    args = parser.parse_args(argv)
    setup_logging()
    params = config.load(args.params)
    record_environment("candidates", Path(args.metrics).parent / "env")
    metrics = run(
        args.model,
        args.onnx,
        args.data_dir,
        args.postprocessing,
        args.out_dir,
        params.candidates,
        params.inference,
        params.base.seed,
    )
    write_json(args.metrics, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
