"""Stage evaluate: the trained model on the held-out test split, voxel- and lesion-level.

In:  ``MODEL`` (models/model.pt), ``DATA_DIR`` (data/processed), ``--postprocessing``
     (models/postprocessing.json: threshold, component threshold and shape weight chosen on the
     validation split by the postprocess stage), params ``evaluate``, ``inference`` and
     ``base.seed`` (the bootstrap). The network runs on ``inference.runtime`` (auto: PyTorch on a
     CUDA GPU, else ONNX Runtime on the CPU), every test volume read along ``inference.views`` and
     mirrored along ``inference.mirror_axes``.
Out: ``metrics/evaluate.json``: Dice, IoU, HD95 (mm), surface Dice (mean over test cases with
     nodules), LUNA16 FROC: CPM with a bootstrap 95% interval, sensitivity at 1/8 .. 8 false
     positives per scan, and sensitivity / false positives per scan at the operating point (the
     components the nodule mask keeps, :func:`ctpipe.postprocessing.candidates.find_nodules`: one
     definition of a detection for the mask, the operating point, the FROC and the lesion
     confusion table).
     With bootstrap intervals also the operating point's sensitivity and FPs per scan, and its
     sensitivity per nodule ``type``, ``texture`` and ``margin`` (``sensitivity_by_type``, ...;
     empty where ``nodules.csv`` has no such column); ``subgroups_flagged``: how many subgroups
     do worse than the whole split.
     With ``--malignancy`` (models/malignancy.json): the model's ROC AUC on the rated test nodules
     the segmentation finds, side by side with the segmentation's diameter and the annotated
     diameter as the score, each with a bootstrap 95% interval, and the model's paired gain.
     ``PLOTS_DIR/`` (metrics/evaluate): ``per_case.csv``, ``froc.csv``, ``candidates.csv``,
     ``lesion_confusion.csv`` (nodules detected / missed, false candidates, at the operating point),
     ``malignancy.csv`` (with ``--malignancy``: each rated test nodule a candidate hits, its
     figures, label and the model's probability),
     ``subgroups.csv`` (sensitivity, FPs per scan and CPM with intervals per sex, age band,
     scanner, slice thickness, nodule size band, type, texture, margin, and a flag:
     :mod:`ctpipe.evaluation.subgroups`), ``overlays/best.png`` and ``overlays/worst.png`` (image,
     truth, prediction).
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ctpipe import config, malignancy  # noqa: E402
from ctpipe.classifier import CandidateClassifier  # noqa: E402
from ctpipe.deploy import runtime  # noqa: E402
from ctpipe.evaluation import luna16, scoring, subgroups  # noqa: E402
from ctpipe.fileio import rounded, write_csv, write_json  # noqa: E402
from ctpipe.model import data, nets  # noqa: E402
from ctpipe.params import add_model_inputs, setup_logging, stage_parser  # noqa: E402
from ctpipe.postprocessing import choose  # noqa: E402
from ctpipe.postprocessing.candidates import Chosen  # noqa: E402
from ctpipe.runenv import record as record_environment  # noqa: E402

log = logging.getLogger("evaluate")
FP_RATES = luna16.LUNA16_FP_RATES
KINDS = subgroups.NODULE_COLUMNS  # sensitivity_by_type, _texture, _margin in evaluate.json


def drawn_slice(truth: np.ndarray, pred: np.ndarray) -> int:
    """The slice an overlay shows: the one with the most truth voxels (else predicted ones)."""
    return int(np.argmax((truth if truth.any() else pred).sum(axis=(1, 2))))


def overlay(
    path: Path, k: int, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str
) -> None:
    """Slice ``k`` (``image``, ``truth``, ``pred`` are its 2D arrays): image, truth, prediction."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (name, mask) in zip(axes, [("image", None), ("truth", truth), ("prediction", pred)]):
        ax.imshow(image, cmap="gray")
        if mask is not None:
            ax.contour(
                mask, levels=[0.5], colors="lime" if name == "truth" else "red", linewidths=1
            )
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title} (slice {k})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


class Overlays:
    """The best and the worst test case with nodules (by Dice, ties by case id), kept while the
    cases stream past: only the slice each overlay draws, so no volume stays behind its case."""

    def __init__(self) -> None:
        self.kept: dict[str, tuple] = {}
        self._keys: dict[str, tuple] = {}

    def offer(self, row: dict, image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> None:
        if row["truth_voxels"] == 0 or np.isnan(row["dice"]):
            return
        key = (row["dice"], row["case_id"])
        for name, better in (
            ("worst", key < self._keys.get("worst", (np.inf, ""))),
            ("best", key > self._keys.get("best", (-np.inf, ""))),
        ):
            if better:
                k = drawn_slice(truth, pred)
                # copies: a slice of a volume would keep the whole volume alive
                slices = tuple(a[k].copy() for a in (image, truth, pred))
                self._keys[name], self.kept[name] = key, (row, k, *slices)


def write_plots(
    plots: Path,
    score: scoring.SplitScore,
    nodules: pd.DataFrame,
    operating: dict,
    overlays: Overlays,
    groups: pd.DataFrame,
) -> None:
    """metrics/evaluate/: per-case table, candidates, lesion confusion, subgroups, FROC curve,
    overlays of the best and the worst test case with nodules."""
    per_case, cands, froc = score.per_case, score.candidates, score.froc
    if plots.exists():
        shutil.rmtree(plots)
    plots.mkdir(parents=True)
    write_csv(plots / "per_case.csv", per_case.round(4))
    write_csv(plots / "candidates.csv", luna16.match_candidates(cands, nodules))
    write_csv(plots / "lesion_confusion.csv", operating["confusion"])
    write_csv(plots / "subgroups.csv", groups.round(4))
    curve = froc["curve"]
    write_csv(
        plots / "froc.csv",
        pd.DataFrame(
            {"fps_per_scan": curve["fps_per_scan"], "sensitivity": curve["sensitivity"]}
        ).round(4),
    )
    for name, (row, k, image, truth, pred) in overlays.kept.items():
        overlay(
            plots / "overlays" / f"{name}.png",
            k,
            image,
            truth,
            pred,
            f"{name} test case {row['case_id']}: Dice {row['dice']:.3f}",
        )


def score_cases(
    predicted: Iterator[tuple],
    chosen: Chosen,
    cfg: config.Evaluate,
    min_candidate_mm3: float,
    second: CandidateClassifier | None = None,
    third: tuple[malignancy.MalignancyModel, dict] | None = None,
) -> tuple[list[dict], list[pd.DataFrame], Overlays]:
    """Each test case's row and candidates (:func:`ctpipe.evaluation.scoring.score_case`) and the
    overlays, from ``predicted`` (:func:`ctpipe.deploy.runtime.predict_cases`) one case at a time;
    with ``second``, ranked by the candidate classifier's score
    (:meth:`ctpipe.classifier.CandidateClassifier.rescore`); with ``third`` (the malignancy model
    and the plan's normalisation), each candidate's figures and ``malignancy``."""
    rows, candidates, overlays = [], [], Overlays()
    for case, image, truth, prob, geom in predicted:
        mask, found = chosen.find_nodules(prob, geom, min_candidate_mm3)
        if second is not None:  # the classifier's score ranks the candidates (the FROC)
            found = second.rescore(image, geom, found)
        if third is not None:
            model, norm = third
            feats = malignancy.features(image, geom, found, norm)
            found = pd.concat([found, feats.assign(malignancy=model.probability(feats))], axis=1)
        row, cands = scoring.score_case(case, truth, mask, found, geom, cfg.surface_tolerance_mm)
        rows.append(row)
        candidates.append(cands)
        overlays.offer(row, image, truth, mask)
        del image, truth, prob, mask  # else they stay while the next case is predicted
    return rows, candidates, overlays


def run(
    model_path: Path,
    onnx_path: Path,
    processed: Path,
    plots: Path,
    chosen: Chosen,
    cfg: config.Evaluate,
    inference: config.Inference,
    seed: int,
    second: CandidateClassifier | None = None,
    third: malignancy.MalignancyModel | None = None,
) -> dict:
    net, ckpt = nets.load_checkpoint(str(model_path))
    cases, nodules = data.split_cases(processed, "test")
    predicted = runtime.predict_cases(
        net,
        processed,
        cases,
        inference,
        ckpt["train_params"]["context_slices"],
        onnx_path,
        "evaluate",
    )
    norm = data.load_plan(processed)["normalization"]
    rows, candidates, overlays = score_cases(
        predicted, chosen, cfg, inference.min_candidate_mm3, second, third and (third, norm)
    )
    score = scoring.summarise(rows, candidates, nodules, FP_RATES)
    cands, froc, summary = score.candidates, score.froc, score.voxel
    if second is None:
        segmentation = froc
    else:  # the same candidates ranked by the segmentation's score alone
        seg_ranked = cands.assign(score=cands["seg_score"])
        segmentation = luna16.froc(seg_ranked, nodules, len(cases), FP_RATES)
    test_uids = [c["seriesuid"] for c in cases]
    boot = luna16.bootstrap_froc(cands, nodules, test_uids, cfg.bootstrap, seed, FP_RATES)
    operating = luna16.operating_point(cands, nodules, len(cases))
    groups = subgroups.report(cands, nodules, cases, cfg.bootstrap, seed)
    overall = groups.iloc[0]

    write_plots(plots, score, nodules, operating, overlays, groups)
    mal = {}
    if third is not None:
        found = malignancy.found_nodules(luna16.match_candidates(cands, nodules), nodules)
        write_csv(plots / "malignancy.csv", found.round(5))
        rated = int(malignancy.labels_of(nodules).notna().sum())
        mal = malignancy.test_report(found, rated, cfg.bootstrap, seed)
    return rounded(
        {
            "dice": summary["dice"],
            "iou": summary["iou"],
            "hd95_mm": summary["hd95_mm"],
            "surface_dice": summary["surface_dice"],
            "froc_cpm": froc["cpm"],
            "froc_cpm_ci95": [boot["cpm"]["lo"], boot["cpm"]["hi"]],
            "froc_cpm_segmentation": segmentation["cpm"],
            "classifier": second is not None,
            "sensitivity_at_fp": {
                f"{rate:g}": value for rate, value in froc["sensitivity_at"].items()
            },
            "sensitivity": operating["sensitivity"],
            "sensitivity_ci95": _pair(overall, "sensitivity"),
            "fp_per_scan": operating["fp_per_scan"],
            "fp_per_scan_ci95": _pair(overall, "fp_per_scan"),
            **{f"sensitivity_by_{a}": subgroups.sensitivity_by(groups, a) for a in KINDS},
            "subgroups_flagged": int(groups["flagged"].sum()),
            "test_cases": len(cases),
            "test_nodules": int(len(nodules)),
            **mal,
        }
    )


def _pair(row: pd.Series, metric: str) -> list[float]:
    return [round(float(row[f"{metric}_lo"]), 4), round(float(row[f"{metric}_hi"]), 4)]


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "evaluate")
    add_model_inputs(parser, onnx=True)
    parser.add_argument(
        "plots_dir", type=Path, help="per-case table, FROC curve, overlays (metrics/evaluate)"
    )
    parser.add_argument(
        "--classifier",
        type=Path,
        default=None,
        help="candidate classifier (models/classifier.pt); without it, the segmentation alone",
    )
    parser.add_argument(
        "--malignancy",
        type=Path,
        default=None,
        help="malignancy model (models/malignancy.json); without it, or without a model in it, "
        "no malignancy figures",
    )
    args = parser.parse_args(argv)
    setup_logging()
    params = config.load(args.params)
    chosen = choose.load(args.postprocessing)
    third = None if args.malignancy is None else malignancy.load_optional(args.malignancy)
    second = None if args.classifier is None else CandidateClassifier.load(args.classifier)
    record_environment("evaluate", Path(args.metrics).parent / "env")
    result = run(
        args.model,
        args.onnx,
        args.data_dir,
        args.plots_dir,
        chosen,
        params.evaluate,
        params.inference,
        params.base.seed,
        second,
        third,
    )
    write_json(args.metrics, result)
    log.info("evaluate: Dice %s, CPM %s", result["dice"], result["froc_cpm"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
