"""Stage evaluate: the trained model on the held-out test split, voxel- and lesion-level.

In:  ``MODEL`` (models/model.pt), ``DATA_DIR`` (data/processed), params ``evaluate``, ``inference``
     and ``base.seed``. The network runs on ``evaluate.runtime`` (auto: PyTorch on a CUDA GPU, else
     ONNX Runtime on the CPU), every test volume read along ``inference.views`` and mirrored along
     ``inference.mirror_axes``.
Out: ``metrics/evaluate.json``: Dice, IoU, HD95 (mm), surface Dice (mean over test cases with
     nodules), LUNA16 FROC: CPM with a bootstrap 95% interval, sensitivity at 1/8 .. 8 false
     positives per scan, and sensitivity / false positives per scan at the operating point (a
     candidate whose peak probability reaches ``max(threshold, component_threshold)``, the ones
     the nodule mask keeps).
     ``PLOTS_DIR/`` (metrics/evaluate): ``per_case.csv``, ``froc.csv``, ``candidates.csv``,
     ``lesion_confusion.csv`` (nodules detected / missed, false candidates, at the operating point),
     ``overlays/best.png`` and ``overlays/worst.png`` (image, truth, prediction).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from ctpipe import data, detect, infer, metrics, nets, onnxtools  # noqa: E402
from ctpipe.fileio import rounded, write_csv, write_json  # noqa: E402
from ctpipe.params import stage_params
from ctpipe.runenv import record as record_environment  # noqa: E402

log = logging.getLogger("evaluate")
FP_RATES = metrics.LUNA16_FP_RATES


RUNTIMES = ("auto", "torch", "onnxruntime")


def resolve_runtime(runtime: str) -> str:
    """``auto``: PyTorch on a CUDA GPU when there is one, else ONNX Runtime (on CPU it runs this
    network about 1.6x faster than PyTorch eager, and it is the runtime the exported package uses)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"evaluate.runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        return "torch" if torch.cuda.is_available() else "onnxruntime"
    return runtime


def make_predictor(net: torch.nn.Module, channels: int, runtime: str, workdir: Path) -> infer.Predictor:
    """The network as a predictor on ``runtime`` (:func:`resolve_runtime`): PyTorch (CUDA when
    present), or ONNX Runtime on CPU through an fp32 ONNX export written to ``workdir``."""
    runtime = resolve_runtime(runtime)
    if runtime == "torch":
        return infer.torch_predictor(net, "cuda" if torch.cuda.is_available() else "cpu")
    path = workdir / "model.onnx"
    onnxtools.export_onnx(net, channels, path, onnxtools.DEFAULT_OPSET)
    return infer.onnx_predictor(onnxtools.ort_session(path))


def predict_cases(net, processed: Path, cases: list[dict], cfg: dict, context: int, desc: str = "evaluate"):
    """Yield ``(case, image, truth, prob, geometry)`` for each case, inferred on ``cfg["runtime"]``
    with the views and test-time mirroring of ``cfg`` (also used by
    ``scripts/tune_postprocessing.py`` on the validation split)."""
    with tempfile.TemporaryDirectory(prefix="ctpipe-evaluate-") as tmp:
        predictor = make_predictor(net, 2 * context + 1, cfg["runtime"], Path(tmp))
        for case in tqdm(cases, desc=desc, unit="case"):
            image, label, geom = data.load_case(processed, case["case_id"])
            image = np.asarray(image, dtype=np.float32)
            prob = infer.predict_volume(predictor, image, context, int(cfg["roi_size"]), float(cfg["overlap"]),
                                        views=cfg["views"], mirror_axes=cfg["mirror_axes"])
            yield case, image, np.asarray(label) > 0, prob, geom


def overlay(path: Path, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str) -> None:
    """The slice with the most truth voxels (else predicted ones): image, truth, prediction."""
    k = int(np.argmax((truth if truth.any() else pred).sum(axis=(1, 2))))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (name, mask) in zip(axes, [("image", None), ("truth", truth), ("prediction", pred)]):
        ax.imshow(image[k], cmap="gray")
        if mask is not None:
            ax.contour(mask[k], levels=[0.5], colors="lime" if name == "truth" else "red", linewidths=1)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"{title} (slice {k})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def lesion_confusion(matched: pd.DataFrame, nodules: pd.DataFrame, detected: pd.Series) -> pd.DataFrame:
    """One row per nodule (detected or missed) and per false candidate, among the ``detected``
    candidates (:func:`ctpipe.detect.at_operating_point`, aligned with ``matched``)."""
    hits = matched[detected & matched["is_tp"]]["nodule_index"]
    found = set(int(i) for i in hits)
    fps = int((detected & (matched["nodule_index"] < 0)).sum())
    rows = [{"actual": "nodule", "predicted": "nodule" if i in found else "background"} for i in range(len(nodules))]
    rows += [{"actual": "background", "predicted": "nodule"}] * fps
    return pd.DataFrame(rows, columns=["actual", "predicted"])


def run(model_path: Path, processed: Path, plots: Path, cfg: dict, seed: int) -> dict:
    net, ckpt = nets.load_checkpoint(str(model_path))
    torch.manual_seed(seed)
    index = data.load_index(processed)
    cases = data.cases_in(index, "test")
    if not cases:
        raise ValueError(f"{processed}/index.json: the test split is empty")
    all_nodules = data.load_nodules(processed)
    test_uids = [c["seriesuid"] for c in cases]
    nodules = all_nodules[all_nodules["seriesuid"].isin(test_uids)].reset_index(drop=True)
    rows, candidates, kept = [], [], {}
    for case, image, truth, prob, geom in predict_cases(net, processed, cases, cfg,
                                                        int(ckpt["train_params"]["context_slices"])):
        voxel, cands, pred = metrics.score_volume(
            prob, truth, geom, threshold=float(cfg["threshold"]), component_threshold=float(cfg["component_threshold"]),
            candidate_threshold=float(cfg["candidate_threshold"]), min_candidate_mm3=float(cfg["min_candidate_mm3"]),
            shape_weight=float(cfg["shape_weight"]), surface_tolerance_mm=float(cfg["surface_tolerance_mm"]))
        rows.append({"case_id": case["case_id"], "seriesuid": case["seriesuid"], "nodules": int(case["nodules"]),
                     "truth_voxels": int(truth.sum()), "pred_voxels": int(pred.sum()), **voxel})
        candidates.append(cands.assign(seriesuid=case["seriesuid"]))
        kept[case["case_id"]] = (image, truth, pred)
    per_case = pd.DataFrame(rows)
    cands = pd.concat(candidates, ignore_index=True)
    froc = metrics.froc(cands, nodules, len(cases), FP_RATES)
    boot = metrics.bootstrap_froc(cands, nodules, test_uids, int(cfg["bootstrap"]), seed, FP_RATES)
    detected = detect.at_operating_point(cands, cfg["threshold"], cfg["component_threshold"])
    operating = metrics.froc(cands[detected], nodules, len(cases), FP_RATES)

    if plots.exists():
        shutil.rmtree(plots)
    plots.mkdir(parents=True)
    write_csv(plots / "per_case.csv", per_case.round(4))
    matched = metrics.match_candidates(cands, nodules)
    write_csv(plots / "candidates.csv", matched)
    write_csv(plots / "lesion_confusion.csv", lesion_confusion(matched, nodules, detected))
    curve = froc["curve"]
    write_csv(plots / "froc.csv", pd.DataFrame({"fps_per_scan": curve["fps_per_scan"],
                                                "sensitivity": curve["sensitivity"]}).round(4))
    # Best and worst among the cases with nodules, the cases the Dice figure is about.
    scored = per_case[per_case["truth_voxels"] > 0].dropna(subset=["dice"]).sort_values(["dice", "case_id"])
    for name, row in (("worst", scored.iloc[0]), ("best", scored.iloc[-1])) if len(scored) else ():
        image, truth, pred = kept[row["case_id"]]
        overlay(plots / "overlays" / f"{name}.png", image, truth, pred,
                f"{name} test case {row['case_id']}: Dice {row['dice']:.3f}")
    # Voxel metrics are averaged over the cases that have nodules; cases without one are judged
    # by the lesion-level figures (their false positives count in fp_per_scan).
    with_nodules = per_case[per_case["truth_voxels"] > 0]
    summary = metrics.aggregate(with_nodules[["dice", "iou", "hd95_mm", "surface_dice"]].to_dict("records"))
    return rounded({
        "dice": summary["dice"], "iou": summary["iou"], "hd95_mm": summary["hd95_mm"],
        "surface_dice": summary["surface_dice"],
        "froc_cpm": froc["cpm"], "froc_cpm_ci95": [boot["cpm"]["lo"], boot["cpm"]["hi"]],
        "sensitivity_at_fp": {f"{rate:g}": value for rate, value in froc["sensitivity_at"].items()},
        "sensitivity": operating["sensitivity"], "fp_per_scan": operating["fp_per_scan"],
        "test_cases": len(cases), "test_nodules": int(len(nodules)),
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="trained model (models/model.pt)")
    parser.add_argument("data_dir", type=Path, help="preprocessed dataset (data/processed)")
    parser.add_argument("plots_dir", type=Path, help="per-case table, FROC curve, overlays (metrics/evaluate)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg, seed = stage_params("evaluate", args.params, shared=("inference",))
    record_environment("evaluate", Path(args.metrics).parent / "env")
    result = run(args.model, args.data_dir, args.plots_dir, cfg, seed)
    write_json(args.metrics, result)
    log.info("evaluate: Dice %.4f, CPM %.4f", result["dice"], result["froc_cpm"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
