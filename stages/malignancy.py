"""Stage malignancy: a malignancy model on the nodules the segmentation finds, from their ratings.

In:  ``CANDIDATES`` (data/candidates: the train and val splits' candidates, each with the nodule it
     hits), ``DATA_DIR`` (data/processed: the preprocessed images, ``nodules.csv`` with the readers'
     ratings ``malignancy_1`` .. ``malignancy_4``), params ``malignancy`` and ``base.seed``.
Out: ``MODEL`` (models/malignancy.json: :class:`ctpipe.malignancy.MalignancyModel`, or
     ``{"model": null, "reason": ...}`` when the cohort has no ratings), ``--tables``
     (metrics/malignancy_tables: ``cv.csv``, each train and val nodule's figures, label and
     out-of-fold probability), ``--metrics`` (metrics/malignancy.json).

A nodule takes the figures of the candidate that hits it with the highest segmentation score
(:mod:`ctpipe.malignancy`), so it is read as evaluate and predict read a found nodule. Its label is
the readers' verdict (mean rating above 3); a nodule no reader rated, or that the segmentation
misses, is left out and counted. The model is a logistic regression on the standardised figures
(scikit-learn), fitted on the train and val nodules together: the val split alone holds about 22
found nodules, too few to choose on. Its regularisation is chosen by cross-validated ROC AUC among
``malignancy.c_grid`` (:data:`FOLDS` folds that keep a scan's nodules together, shuffled
:data:`REPEATS` times); it is kept only if its out-of-fold scores beat those of the same
regression on the diameter alone in ``malignancy.gain_confidence`` of paired bootstrap resamples
of the scans, else the diameter's regression is the model (the other figures weigh 0). The test
split stays out of all of it. The diameter-only baseline is the segmentation's diameter itself as
the score.

Without ratings (a LUNA16 or DICOM cohort whose ``annotations.csv`` has none: LIDC-IDRI's XML holds
them, see docs/own-data.md) no model is fitted; evaluate and export then leave malignancy out.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ctpipe import config, malignancy
from ctpipe.annotations import RATINGS
from ctpipe.fileio import rounded, write_csv, write_json
from ctpipe.model import data
from ctpipe.params import setup_logging, stage_parser
from ctpipe.runenv import record as record_environment

log = logging.getLogger("malignancy")
FOLDS = 5  # of the cross-validation over the train and val nodules (fewer where a label has fewer)
REPEATS = 5  # shufflings of the folds, their out-of-fold scores averaged


def split_table(candidates: Path, processed: Path, split: str) -> tuple[pd.DataFrame, dict]:
    """One row per rated nodule the split's segmentation finds (:func:`ctpipe.malignancy.
    found_nodules`) with its figures; and the counts of the nodules left out."""
    _, nodules = data.split_cases(processed, split)
    table = pd.read_csv(candidates / f"{split}.csv", dtype={"case_id": str})
    found = malignancy.found_nodules(table[table["source"] == "candidate"], nodules)
    rated = int(malignancy.labels_of(nodules).notna().sum())
    norm = data.load_plan(processed)["normalization"]
    figures = []
    for case_id, rows in found.groupby("case_id", sort=False):
        image, _, geom = data.load_case(processed, case_id)
        figures.append(malignancy.features(image, geom, rows, norm))
        del image
    columns = ["case_id", "seriesuid", "nodule_index", "diameter_mm", "annotated_diameter_mm"]
    feats = pd.concat(figures) if figures else pd.DataFrame(columns=list(malignancy.FEATURES))
    out = pd.concat([found[[*columns, "label"]], feats], axis=1)
    counts = {
        "nodules": len(nodules),
        "rated": rated,
        "missed_by_segmentation": rated - len(found),
        "used": len(found),
        "malignant": int(found["label"].sum()),
    }
    return out, counts


def _design(table: pd.DataFrame, used: list[str]) -> np.ndarray:
    return table[used].to_numpy(np.float64)


def _regression(c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, random_state=seed))


def out_of_fold(table: pd.DataFrame, used: list[str], c: float, seed: int) -> np.ndarray:
    """Each nodule's decision value from regressions fitted without its scan: stratified, grouped
    :data:`FOLDS`-fold cross-validation (the nodules of a scan stay in one fold), the mean over
    :data:`REPEATS` shufflings."""
    from sklearn.model_selection import StratifiedGroupKFold

    x, y, scans = _design(table, used), table["label"].to_numpy(int), table["case_id"].to_numpy()
    folds = min(FOLDS, int(np.bincount(y).min()), len(np.unique(scans)))
    out = np.zeros((REPEATS, len(table)))
    for repeat in range(REPEATS):
        split = StratifiedGroupKFold(folds, shuffle=True, random_state=seed + repeat)
        for fit_rows, held in split.split(x, y, scans):
            reg = _regression(c, seed).fit(x[fit_rows], y[fit_rows])
            out[repeat, held] = reg.decision_function(x[held])
    return out.mean(axis=0)


def fit(table: pd.DataFrame, used: list[str], cfg, seed: int):
    """The regularisation of ``cfg.c_grid`` whose regression on the figures ``used`` has the best
    cross-validated ROC AUC (:func:`out_of_fold`; ties: the weaker regularisation, so that the
    probability the SR carries is not squeezed by one the ranking does not need); the model fitted
    with it on every nodule of ``table`` (the other figures weigh 0), its out-of-fold decision
    values and the AUC per C."""
    from sklearn.metrics import roc_auc_score

    cols = list(malignancy.FEATURES)
    tried, best = {}, None
    for c in sorted(cfg.c_grid):
        oof = out_of_fold(table, used, c, seed)
        tried[c] = float(roc_auc_score(table["label"], oof))
        if best is None or tried[c] >= tried[best[0]]:
            best = (c, oof)
    c, oof = best
    reg = _regression(c, seed).fit(_design(table, used), table["label"].to_numpy(int))
    scaler, logistic = reg[0], reg[-1]
    mean, scale, coef = np.zeros(len(cols)), np.ones(len(cols)), np.zeros(len(cols))
    pick = [cols.index(name) for name in used]
    mean[pick], scale[pick], coef[pick] = scaler.mean_, scaler.scale_, logistic.coef_[0]
    model = malignancy.MalignancyModel(
        features=tuple(cols),
        mean=tuple(float(v) for v in mean),
        scale=tuple(float(v) for v in scale),
        coef=tuple(float(v) for v in coef),
        intercept=float(logistic.intercept_[0]),
    )
    return model, c, oof, tried


def choose(table: pd.DataFrame, cfg, seed: int) -> tuple:
    """The model on every figure if its out-of-fold decision values beat those of the model on the
    diameter alone in at least ``cfg.gain_confidence`` of paired bootstrap resamples of the scans,
    else the diameter's (a gain within the noise of about 100 nodules would not carry over); its
    out-of-fold decision values and the figures."""
    full, c_full, oof_full, tried = fit(table, list(malignancy.FEATURES), cfg, seed)
    alone, c_alone, oof_alone, _ = fit(table, ["log_diameter"], cfg, seed)
    scores = {"full": oof_full, "diameter": oof_alone}
    auc = malignancy.auc_with_interval(
        table["label"].to_numpy(), scores, table["case_id"].to_numpy(), cfg.bootstrap, seed
    )
    share = auc["diff_diameter"]["share_above"]
    taken = share is not None and share >= cfg.gain_confidence
    figures = {
        "uses_image_figures": taken,
        "cv_gain_share": share,
        "cv_auc_all_figures": auc["full"]["auc"],
        "cv_auc_diameter_model": auc["diameter"]["auc"],
        "cv_auc_by_c": {f"{k:g}": v for k, v in tried.items()},
        "c": c_full if taken else c_alone,
    }
    return (full if taken else alone), (oof_full if taken else oof_alone), figures


def no_model(model_path: Path, tables: Path, reason: str) -> dict:
    """``models/malignancy.json`` saying why there is no model (evaluate and export then leave
    malignancy out), an empty val table; the stage's figures."""
    log.warning("no malignancy model: %s", reason)
    write_json(model_path, {"model": None, "reason": reason})
    tables.mkdir(parents=True, exist_ok=True)
    columns = ["split", "case_id", "seriesuid", "nodule_index", *malignancy.FEATURES, "label"]
    write_csv(tables / "cv.csv", pd.DataFrame(columns=[*columns, "probability"]))
    return {"model": False, "reason": reason}


def run(candidates: Path, processed: Path, model_path: Path, tables: Path, cfg, seed: int) -> dict:
    model_path.parent.mkdir(parents=True, exist_ok=True)
    nodules = data.load_nodules(processed)
    if not any(c in nodules.columns for c in RATINGS):
        reason = "nodules.csv has no malignancy ratings (malignancy_1 .. _4)"
        return no_model(model_path, tables, reason)
    train, train_counts = split_table(candidates, processed, "train")
    val, val_counts = split_table(candidates, processed, "val")
    table = pd.concat([train.assign(split="train"), val.assign(split="val")], ignore_index=True)
    each = table.groupby("label")["case_id"].nunique().reindex([0, 1], fill_value=0)
    if each.min() < 2:
        reason = "the found rated train and val nodules have a label in fewer than 2 scans"
        return no_model(model_path, tables, reason)
    model, oof, chosen = choose(table, cfg, seed)
    model.save(model_path)
    table = table.assign(probability=1.0 / (1.0 + np.exp(-oof)))  # out of fold
    tables.mkdir(parents=True, exist_ok=True)
    write_csv(tables / "cv.csv", table.round(5))
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(table["label"], oof)
    by_diameter = roc_auc_score(table["label"], table["diameter_mm"])
    log.info(
        "cross-validated AUC on the train and val nodules %.3f (the diameter itself %.3f); every "
        "figure: AUC %.3f, above the diameter's model in %s of the resamples: %s",
        auc,
        by_diameter,
        chosen["cv_auc_all_figures"],
        chosen["cv_gain_share"],
        "taken" if chosen["uses_image_figures"] else "not taken, the diameter alone",
    )
    return rounded(
        {
            "model": True,
            **chosen,
            "cv_auc": float(auc),
            "cv_auc_diameter": float(by_diameter),
            "coef": dict(zip(model.features, model.coef)),
            **{f"train_{k}": v for k, v in train_counts.items()},
            **{f"val_{k}": v for k, v in val_counts.items()},
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "malignancy")
    parser.add_argument("candidates", type=Path, help="candidate tables (data/candidates)")
    parser.add_argument("data_dir", type=Path, help="preprocessed cohort (data/processed)")
    parser.add_argument("model", type=Path, help="the fitted model (models/malignancy.json)")
    parser.add_argument(
        "--tables",
        type=Path,
        default=Path("metrics/malignancy_tables"),
        help="cross-validated train and val nodules",
    )
    args = parser.parse_args(argv)
    setup_logging()
    params = config.load(args.params)
    record_environment("malignancy", Path(args.metrics).parent / "env")
    metrics = run(
        args.candidates,
        args.data_dir,
        args.model,
        args.tables,
        params.malignancy,
        params.base.seed,
    )
    write_json(args.metrics, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
