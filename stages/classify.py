"""Stage classify: train the candidate classifier, and choose on val how its score is used.

In:  ``CANDIDATES`` (data/candidates: the candidates stage's tables), ``DATA_DIR``
     (data/processed: the volumes the crops are cut from, the val nodules and cases), params
     ``classify`` and ``base.seed``.
Out: ``MODEL`` (models/classifier.pt: MONAI ``Classifier`` weights of the epoch with the best val
     AUC, the crop size and the chosen ``weight``, read by evaluate), ``LIVE_DIR``
     (dvclive: per-epoch train loss, val loss and val AUC), ``TABLES_DIR`` (``weights.csv``: the
     val CPM of each weight of ``classify.weight_grid`` and the share of resamples it beats 0
     in), ``metrics/classify.json``.

Training: the train split's crops, ``classify.positive_fraction`` of each epoch drawn from the
nodule crops (the candidates that hit a nodule and the nodules themselves) and the rest from the
other candidates, each shifted by up to ``ctpipe.classifier.MARGIN`` voxels, flipped and turned
(:func:`ctpipe.classifier.augmentations`); binary cross-entropy, AdamW with cosine decay.
Choice on val (the test split plays no part): the weight of the classifier in the candidate
score (:func:`ctpipe.classifier.combine`; 0 is the segmentation's score alone) with the highest
val CPM among those that beat weight 0 in at least ``classify.gain_confidence`` of the paired
bootstrap resamples of the val scans (:func:`ctpipe.classifier.choose_weight`): with a small val
split the classifier is used only when its gain is beyond the noise. Which candidates are detections stays the
segmentation's operating point (``models/postprocessing.json``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from dvclive import Live
from sklearn.metrics import roc_auc_score

from ctpipe import classifier, config
from ctpipe.fileio import read_json, rounded, write_csv, write_json
from ctpipe.model import data
from ctpipe.params import setup_logging, stage_parser
from ctpipe.progress import progress
from ctpipe.runenv import record as record_environment

log = logging.getLogger("classify")


def load_split(
    candidates: Path, processed: Path, split: str, shape: tuple[int, int, int]
) -> tuple[pd.DataFrame, np.ndarray]:
    """A split's table and the crop of each row (with the margin of the training shifts), cut
    from its case's preprocessed image, one case in memory at a time."""
    table = pd.read_csv(candidates / f"{split}.csv", dtype={"case_id": str})
    crops = np.empty((len(table), *(s + 2 * classifier.MARGIN for s in shape)), np.float16)
    for case_id, rows in table.groupby("case_id", sort=False):
        image, _, geom = data.load_case(processed, case_id)
        xyz = rows[["coordX", "coordY", "coordZ"]].to_numpy(np.float64)
        crops[rows.index.to_numpy()] = classifier.cut_crops(
            image, geom, xyz, shape, classifier.MARGIN
        )
    return table, crops


def epoch_indices(labels: np.ndarray, cfg: config.Classify, rng: np.random.Generator) -> np.ndarray:
    """``samples_per_epoch`` crop indices, ``positive_fraction`` of them nodules, shuffled."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if not len(pos) or not len(neg):
        raise ValueError(f"the train split has {len(pos)} nodule and {len(neg)} other crops")
    n_pos = round(cfg.samples_per_epoch * cfg.positive_fraction)
    picked = np.r_[rng.choice(pos, n_pos), rng.choice(neg, cfg.samples_per_epoch - n_pos)]
    return rng.permutation(picked)


def batch_of(
    crops: np.ndarray, index: np.ndarray, rng: np.random.Generator, augment
) -> torch.Tensor:
    shifted = classifier.random_shift(crops[index].astype(np.float32), rng)
    return torch.stack([torch.as_tensor(augment(c[None])) for c in shifted])


def train(
    cfg: config.Classify,
    train_set: tuple[pd.DataFrame, np.ndarray],
    val_set: tuple[pd.DataFrame, np.ndarray],
    shape: tuple[int, int, int],
    seed: int,
    live: Live,
) -> tuple[torch.nn.Module, dict]:
    """The network after training, with the weights of its best val AUC, and the training record."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    augment = classifier.augmentations()
    augment.set_random_state(seed)
    net = classifier.make_net(shape, cfg.channels)
    (table, crops), (val_table, val_crops) = train_set, val_set
    labels, val_labels = table["label"].to_numpy(), val_table["label"].to_numpy()
    val_input = classifier.centre(val_crops).astype(np.float32)
    steps = cfg.epochs * -(-cfg.samples_per_epoch // cfg.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best: dict = {}
    start = time.perf_counter()
    for epoch in progress(range(cfg.epochs), desc="classify", unit="epoch"):
        net.train()
        losses = []
        order = epoch_indices(labels, cfg, rng)
        for i in range(0, len(order), cfg.batch_size):
            index = order[i : i + cfg.batch_size]
            x = batch_of(crops, index, rng, augment)
            y = torch.as_tensor(labels[index], dtype=torch.float32)
            loss = loss_fn(net(x).flatten(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        prob = classifier.probabilities(net, val_input)
        val_auc = _auc(val_labels, prob)
        val_loss = float(
            torch.nn.functional.binary_cross_entropy(
                torch.as_tensor(prob).clamp(1e-7, 1 - 1e-7), torch.as_tensor(val_labels * 1.0)
            )
        )
        live.log_metric("train_loss", float(np.mean(losses)))
        live.log_metric("val_loss", val_loss)
        live.log_metric("val_auc", val_auc)
        live.next_step()
        if not best or val_auc > best["val_auc"] or np.isnan(best["val_auc"]):
            best = {
                "val_auc": val_auc,
                "epoch": epoch + 1,
                "state": {k: v.clone() for k, v in net.state_dict().items()},
            }
    seconds = time.perf_counter() - start
    net.load_state_dict(best.pop("state"))
    net.eval()
    record = {
        **best,
        "train_crops": len(table),
        "train_nodule_crops": int(labels.sum()),
        "seconds": seconds,
        "samples_per_s": cfg.epochs * cfg.samples_per_epoch / seconds,
    }
    return net, record


def _auc(labels: np.ndarray, prob: np.ndarray) -> float:
    return float(roc_auc_score(labels, prob)) if 0 < labels.sum() < len(labels) else float("nan")


def run(
    candidates: Path,
    processed: Path,
    model_path: Path,
    live_dir: Path,
    tables: Path,
    cfg: config.Classify,
    seed: int,
) -> dict:
    summary = read_json(candidates / "summary.json")
    shape = tuple(int(s) for s in summary["crop_shape_kji"])
    train_set = load_split(candidates, processed, "train", shape)
    val_set = load_split(candidates, processed, "val", shape)
    live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False)
    live.log_params({"classify": cfg.model_dump()})
    net, record = train(cfg, train_set, val_set, shape, seed, live)
    live.end()

    val_table, val_crops = val_set
    val_table = val_table[val_table["source"] == "candidate"]
    prob = classifier.probabilities(net, classifier.centre(val_crops[val_table.index.to_numpy()]))
    cands = val_table.assign(classifier=prob, score=val_table["seg_score"])
    cases, nodules = data.split_cases(processed, "val")
    uids = [c["seriesuid"] for c in cases]
    weights, weight = classifier.choose_weight(
        cands, nodules, uids, cfg.weight_grid, cfg.gain_confidence, seed=seed
    )
    log.info("val CPM per weight of the classifier:\n%s", weights.round(4).to_string(index=False))
    cpm = dict(zip(weights["weight"], weights["cpm"]))
    without = cpm[0.0]  # weight 0: the segmentation's score alone (always in the table)
    tables.mkdir(parents=True, exist_ok=True)
    write_csv(tables / "weights.csv", weights.round(4))
    model = classifier.CandidateClassifier(net, shape, float(summary["crop_mm"]), weight)
    record = {**record, "weight": weight, "val_cpm": cpm[weight], "val_cpm_without": without}
    model.save(model_path, cfg.channels, model_record(record))
    log.info(
        "best val AUC %.4f (epoch %d); weight %g: val CPM %.4f (without the classifier %.4f)",
        record["val_auc"],
        record["epoch"],
        weight,
        cpm[weight],
        without,
    )
    return rounded(
        {
            "val_auc": record["val_auc"],
            "best_epoch": record["epoch"],
            "weight": weight,
            "val_cpm": cpm[weight],
            "val_cpm_without": without,
            "train_crops": record["train_crops"],
            "samples_per_s": record["samples_per_s"],
        }
    )


TIMINGS = ("seconds", "samples_per_s")  # in metrics/classify.json, not in the model file


def model_record(record: dict) -> dict:
    """What ``models/classifier.pt`` keeps of the training record: everything but its timings, so
    that the same training writes the same bytes (a timing in the file made every rerun a new
    model to DVC, and evaluate and export ran again for it)."""
    return rounded({k: v for k, v in record.items() if k not in TIMINGS})


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "classify")
    parser.add_argument("candidates", type=Path, help="candidate tables (data/candidates)")
    parser.add_argument("data_dir", type=Path, help="preprocessed dataset (data/processed)")
    parser.add_argument("model", type=Path, help="classifier to write (models/classifier.pt)")
    parser.add_argument("--live", type=Path, required=True, help="dvclive directory")
    parser.add_argument("--tables", type=Path, required=True, help="folder for weights.csv")
    args: argparse.Namespace = parser.parse_args(argv)
    setup_logging()
    params = config.load(args.params)
    record_environment("classify", Path(args.metrics).parent / "env")
    metrics = run(
        args.candidates,
        args.data_dir,
        args.model,
        args.live,
        args.tables,
        params.classify,
        params.base.seed,
    )
    write_json(args.metrics, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
