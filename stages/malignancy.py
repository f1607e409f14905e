"""Stage malignancy: a malignancy model on the nodules the segmentation finds, from their ratings.

In:  ``CANDIDATES`` (data/candidates: the train and val splits' candidates, each with the nodule it
     hits), ``DATA_DIR`` (data/processed: the preprocessed images, ``nodules.csv`` with the readers'
     ratings ``malignancy_1`` .. ``malignancy_4``), params ``malignancy`` and ``base.seed``.
Out: ``MODEL`` (models/malignancy.json: :class:`ctpipe.malignancy.MalignancyModel`, or
     ``{"model": null, "reason": ...}`` when the cohort has no ratings), ``--tables``
     (metrics/malignancy_tables: ``val.csv``, each val nodule's figures, label and probability),
     ``--metrics`` (metrics/malignancy.json).

A nodule takes the figures of the candidate that hits it with the highest segmentation score
(:mod:`ctpipe.malignancy`), so it is read as evaluate and predict read a found nodule. Its label is
the readers' verdict (mean rating above 3); a nodule no reader rated, or that the segmentation
misses, is left out and counted. The model is a logistic regression on the standardised figures
(scikit-learn), its regularisation chosen on val by ROC AUC among ``malignancy.c_grid``; it is
kept only if it beats the same regression on the diameter alone in ``malignancy.gain_confidence``
of paired bootstrap resamples of the val scans, else the diameter's regression is the model (the
other figures weigh 0). The diameter-only baseline is the segmentation's diameter itself as the
score.

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


def fit(train: pd.DataFrame, val: pd.DataFrame, c_grid: list[float], seed: int, used: list[str]):
    """The logistic regression on the figures ``used`` (the others get coefficient 0) with the
    best val AUC over ``c_grid`` (ties: the lower val log loss, so that the probability the SR
    carries is not squeezed by a regularisation the ranking does not need); its per-C val AUCs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.preprocessing import StandardScaler

    cols = list(malignancy.FEATURES)
    pick = [cols.index(name) for name in used]
    scaler = StandardScaler().fit(train[cols].to_numpy(np.float64))
    x_train = scaler.transform(train[cols].to_numpy(np.float64))[:, pick]
    x_val = scaler.transform(val[cols].to_numpy(np.float64))[:, pick]
    tried, best = {}, None
    for c in c_grid:
        reg = LogisticRegression(C=c, random_state=seed).fit(x_train, train["label"])
        auc = float(roc_auc_score(val["label"], reg.decision_function(x_val)))
        rank = (auc, -float(log_loss(val["label"], reg.predict_proba(x_val)[:, 1])))
        tried[c] = auc
        if best is None or rank > best[0]:
            best = (rank, c, reg)
    _, c, reg = best
    coef = np.zeros(len(cols))
    coef[pick] = reg.coef_[0]
    model = malignancy.MalignancyModel(
        features=tuple(cols),
        mean=tuple(float(v) for v in scaler.mean_),
        scale=tuple(float(v) for v in scaler.scale_),
        coef=tuple(float(v) for v in coef),
        intercept=float(reg.intercept_[0]),
    )
    return model, c, tried


def choose(train: pd.DataFrame, val: pd.DataFrame, cfg, seed: int) -> tuple:
    """The model on every figure if it beats the one on the diameter alone in at least
    ``cfg.gain_confidence`` of paired bootstrap resamples of the val scans, else the diameter's
    (a gain within the noise of a small val split would not carry over to test); the figures."""
    full, c_full, tried = fit(train, val, cfg.c_grid, seed, list(malignancy.FEATURES))
    alone, c_alone, _ = fit(train, val, cfg.c_grid, seed, ["log_diameter"])
    scores = {"full": full.probability(val), "diameter": alone.probability(val)}
    auc = malignancy.auc_with_interval(
        val["label"].to_numpy(), scores, val["case_id"].to_numpy(), cfg.bootstrap, seed
    )
    share = auc["diff_diameter"]["share_above"]
    taken = share is not None and share >= cfg.gain_confidence
    figures = {
        "uses_image_figures": taken,
        "val_gain_share": share,
        "val_auc_all_figures": auc["full"]["auc"],
        "val_auc_by_c": {f"{k:g}": v for k, v in tried.items()},
        "c": c_full if taken else c_alone,
    }
    return (full if taken else alone), figures


def no_model(model_path: Path, tables: Path, reason: str) -> dict:
    """``models/malignancy.json`` saying why there is no model (evaluate and export then leave
    malignancy out), an empty val table; the stage's figures."""
    log.warning("no malignancy model: %s", reason)
    write_json(model_path, {"model": None, "reason": reason})
    tables.mkdir(parents=True, exist_ok=True)
    columns = ["case_id", "seriesuid", "nodule_index", *malignancy.FEATURES, "label"]
    write_csv(tables / "val.csv", pd.DataFrame(columns=[*columns, "probability"]))
    return {"model": False, "reason": reason}


def run(candidates: Path, processed: Path, model_path: Path, tables: Path, cfg, seed: int) -> dict:
    model_path.parent.mkdir(parents=True, exist_ok=True)
    nodules = data.load_nodules(processed)
    if not any(c in nodules.columns for c in RATINGS):
        reason = "nodules.csv has no malignancy ratings (malignancy_1 .. _4)"
        return no_model(model_path, tables, reason)
    train, train_counts = split_table(candidates, processed, "train")
    val, val_counts = split_table(candidates, processed, "val")
    for name, part in (("train", train), ("val", val)):
        if part["label"].nunique() < 2:
            reason = f"the {name} split's found rated nodules are all one label"
            return no_model(model_path, tables, reason)
    model, chosen = choose(train, val, cfg, seed)
    model.save(model_path)
    val = val.assign(probability=model.probability(val))
    tables.mkdir(parents=True, exist_ok=True)
    write_csv(tables / "val.csv", val.round(5))
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(val["label"], val["probability"])
    by_diameter = roc_auc_score(val["label"], val["diameter_mm"])
    log.info(
        "val AUC %.3f (the diameter itself %.3f); every figure: AUC %.3f, above the diameter's "
        "model in %s of the resamples: %s",
        auc,
        by_diameter,
        chosen["val_auc_all_figures"],
        chosen["val_gain_share"],
        "taken" if chosen["uses_image_figures"] else "not taken, the diameter alone",
    )
    return rounded(
        {
            "model": True,
            **chosen,
            "val_auc": float(auc),
            "val_auc_diameter": float(by_diameter),
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
        "--tables", type=Path, default=Path("metrics/malignancy_tables"), help="val nodules"
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
