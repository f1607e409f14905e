"""Stage export: the deployable, verified model package.

In:  ``MODEL`` (models/model.pt), ``DATA_DIR`` (data/processed), ``QUANT_DIR`` (models/quantized,
     for ``model_int8.onnx``), ``--postprocessing`` (models/postprocessing.json, the post-processing
     chosen on validation, written into ``input_spec.json``), params ``export``, ``inference`` and
     ``base.seed``; read if present:
     ``--evaluate-metrics`` (metrics/evaluate.json) and ``--quantize-metrics`` (metrics/quantize.json)
     for the model card.
Out: ``OUT_DIR`` (models/export): ``model.onnx`` (dynamo export, pinned opset, one file, dynamic
     batch and H/W), ``model_int8.onnx``, ``model.pt2`` (``torch.export``), ``input_spec.json``,
     ``MODEL_CARD.md``, ``versions.json``, ``verification.json``, ``triton/<name>/config.pbtxt`` +
     ``triton/<name>/1/model.onnx``, ``SHA256SUMS`` over every other file; ``metrics/export.json``.

Gate: ``onnx.checker`` (full check), then ONNX Runtime and the reloaded ``.pt2`` against PyTorch
on real validation slabs at every ``parity_shapes`` entry: max |logit difference| <= ``atol`` and
Dice of the thresholded predictions >= ``min_dice``; otherwise the stage fails with the figures.
The package is built in a temporary folder and moved into place only when everything passed.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch
import yaml

from ctpipe import data, nets, onnxtools, postprocess
from ctpipe.fileio import read_json, write_json
from ctpipe.infer import onnx_predictor
from ctpipe.params import stage_params
from ctpipe.runenv import record as record_environment

log = logging.getLogger("export")
LABELS = {"0": "background", "1": "nodule"}
INTENDED_USE = (
    "Research and education only: segmentation and detection of lung nodules in chest CT to develop and "
    "test pipelines. **Not a medical device**; not validated for any clinical purpose; its output must "
    "not inform diagnosis or treatment."
)
LIMITATIONS = [
    (
        "- Trained and evaluated on the cohort above; synthetic phantoms do not reproduce real anatomy, "
        "scanners, reconstruction kernels, contrast, motion or pathology: expect a domain shift on real CT."
    ),
    (
        "- Inputs must be preprocessed exactly as `input_spec.json` states (spacing, body crop, intensity "
        "normalisation); other spacings or HU windows change the output silently."
    ),
    (
        "- 2.5D: each slab sees only its neighbouring slices (the views in `input_spec.json` are averaged, "
        "but no view sees the nodule in 3D at once); very small (< 5 mm), juxta-vascular and ground-glass "
        "nodules are the hardest cases."
    ),
    (
        "- Probabilities are not calibrated; the voxel and component thresholds and the shape weight are "
        "chosen for this model on this cohort's validation split (postprocess stage); retraining on your own "
        "data chooses them again. A component whose peak stays under the component threshold is dropped "
        "whole, large part-solid nodules included."
    ),
    "- INT8 figures hold for the CPU they were measured on; CPUs without VNNI may see no speed-up.",
    "- Intervals are bootstrap intervals over test scans; with few test scans they are wide.",
]


def input_spec(ckpt: dict, plan: dict, cfg: dict) -> dict:
    """How to feed the model and read its output, from the checkpoint, the plan and the params."""
    tp = ckpt["train_params"]
    context = int(tp["context_slices"])
    return {
        "input": {
            "name": onnxtools.INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["N", nets.in_channels(tp), "H", "W"],
            "channels": f"2.5D slab: slices k-{context}..k+{context} of the volume (edge slices "
            "replicated), centre slice in the middle channel",
            "spatial_multiple": onnxtools.SPATIAL_MULTIPLE,
            "dynamic": ["N", "H", "W"],
        },
        "output": {
            "name": onnxtools.OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["N", nets.NUM_CLASSES, "H", "W"],
            "meaning": "logits of the centre slice; no deep-supervision heads (BasicUNet has none)",
        },
        "context_slices": context,
        "label_map": LABELS,
        "preprocessing": {
            "target_spacing_mm_xyz": plan.get("target_spacing_mm"),
            "orientation": "native direction cosines kept (no reorientation); arrays indexed [k, j, i] "
            "= slice, row, column; resampled on the series' own grid",
            "interpolation": plan.get("interpolation"),
            "normalization": plan.get("normalization"),
            "normalization_formula": "(clip(HU, clip[0], clip[1]) - mean) / std",
            "body_crop": {
                "threshold_hu": plan.get("body_threshold_hu"),
                "margin_mm": plan.get("crop_margin_mm"),
            },
        },
        "inference": {
            "patch_size_train": int(tp["patch_size"]),
            "roi_size": int(cfg["roi_size"]),
            "sliding_window_overlap": float(cfg["overlap"]),
            "views": list(cfg["views"]),
            "views_meaning": "slab orientations the volume is also read along (axial: slabs of slices k, "
            "coronal: of rows j, sagittal: of columns i); the foreground probabilities are averaged",
            "mirror_axes": [int(a) for a in cfg["mirror_axes"]],
            "mirror_axes_meaning": "test-time mirroring: each slab [C, H, W] is also predicted mirrored along "
            "every combination of these in-plane axes (0: rows H, 1: columns W), each prediction mirrored back, "
            "and the foreground probabilities averaged ([0, 1]: 4 passes per view; []: one)",
            "blending": "gaussian",
            "padding": "MONAI sliding_window_inference pads slices smaller than the ROI",
        },
        "postprocessing": {
            "softmax": "over the class axis; foreground = channel 1",
            "threshold": float(cfg["threshold"]),
            "component_threshold": float(cfg["component_threshold"]),
            "connected_components": "26-connected, on the stacked 3D probability",
            "mask": "voxels >= threshold, in components of at least min_candidate_mm3 whose highest probability "
            "is >= component_threshold; the nodules listed are those components, one row each",
            "min_candidate_mm3": float(cfg["min_candidate_mm3"]),
            "chosen_on": "threshold, component_threshold and shape_weight chosen on the validation split after "
            "training (postprocess stage, models/postprocessing.json)",
            "shape_weight": float(cfg["shape_weight"]),
            "score": "each nodule's score is its peak probability p with the odds divided by its elongation e "
            "(sqrt of the largest over the smallest eigenvalue of its second moments in mm) to the power "
            "shape_weight: p / (p + (1 - p) * e ** shape_weight); shape_weight 0: the peak",
        },
        "deep_supervision": False,
        # What predict accepts: the modality and the range of acquisition spacings seen in training.
        "accepted_input": {"modalities": ["CT"],
                           "spacing_range_mm": [plan.get("fingerprint", {}).get("spacing_min", [0.0] * 3),
                                                plan.get("fingerprint", {}).get("spacing_max", [1e9] * 3)]},
    }


def data_version(processed: Path) -> dict:
    """Cheap identifiers of the training data and code: index hash, DVC lock entry, git HEAD."""
    out = {
        "index_sha256_16": hashlib.sha256((processed / "index.json").read_bytes()).hexdigest()[:16]
    }
    lock = Path("dvc.lock")
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
        for entry in stages.get("preprocess", {}).get("outs", []):
            if Path(entry.get("path", "")).name == processed.name:
                out["dvc_md5"] = entry.get("md5")
    head = Path(".git/HEAD")
    if head.is_file():  # read the file rather than run git: no subprocess, no git needed
        ref = head.read_text(encoding="utf-8").strip()
        ref_file = Path(".git") / ref[5:] if ref.startswith("ref: ") else None
        out["git_revision"] = (
            ref_file.read_text(encoding="utf-8").strip() if ref_file and ref_file.is_file() else ref
        )
    return out


def model_card(
    ckpt: dict,
    spec: dict,
    verification: dict,
    versions: dict,
    cfg: dict,
    processed: Path,
    evaluation: dict | None,
    quantized: dict | None,
) -> str:
    """MODEL_CARD.md: intended use, data, metrics with intervals, verification, limitations."""
    tp, index = ckpt["train_params"], data.load_index(processed)
    splits = {s: len(data.cases_in(index, s)) for s in ("train", "val", "test")}
    version = data_version(processed)
    model = (
        f"MONAI BasicUNet, 2D on 2.5D slabs ({spec['input']['shape'][1]} channels: the slice and "
        f"{tp['context_slices']} either side; views {list(spec['inference']['views'])} averaged, each slab "
        f"also mirrored along axes {list(spec['inference']['mirror_axes'])}), "
        f"features {list(tp['features'])}, BatchNorm + ReLU, bilinear "
        "up-sampling, 2 output logits (background, nodule), no deep supervision. Files: `model.onnx` (fp32, "
        f"opset {versions['opset']}), `model_int8.onnx` (ORT static QDQ INT8), `model.pt2` (`torch.export`), "
        "`triton/` (Triton onnxruntime backend). How to feed it: `input_spec.json`."
    )
    data_text = (
        f"{cfg['training_data']}. Cases: {splits['train']} train / {splits['val']} val / {splits['test']} test "
        f"(split by patient). Data version: index sha256 `{version['index_sha256_16']}`"
        + (f", DVC md5 `{version['dvc_md5']}`" if version.get("dvc_md5") else "")
        + (
            f"; code revision `{version['git_revision']}` at export time"
            if version.get("git_revision")
            else ""
        )
        + f". Training: up to {tp.get('epochs')} epochs, patch {tp.get('patch_size')}; the model is the "
        f"{ckpt.get('selected', 'best')} checkpoint (epoch {ckpt.get('epoch', -1) + 1}, weight average decay "
        f"{tp.get('ema_decay', 0)}), validation Dice during training (axial, threshold 0.5) "
        f"{_fmt(ckpt.get('val_dice', ckpt.get('best_val_dice')))}; post-processing chosen on validation."
    )
    fig = verification["onnx_vs_torch"]
    verified = (
        f"ONNX Runtime vs PyTorch on real validation slabs {[s['shape'] for s in fig['shapes']]}: max |logit "
        f"diff| {fig['max_abs_diff']:.2e} (tolerance {fig['atol']}), Dice {fig['dice_min']:.5f} (required "
        f"{fig['min_dice']}); `model.pt2` likewise. Details: `verification.json`; integrity: "
        "`sha256sum -c SHA256SUMS`."
    )
    lines = [
        f"# Model card: {cfg['model_name']}",
        "",
        "## Intended use",
        INTENDED_USE,
        "",
        "## Model",
        model,
        "",
        "## Training data",
        data_text,
        "",
        "## Metrics (test split)",
    ]
    lines += _metric_lines(evaluation, "metrics/evaluate.json")
    if quantized:
        lines += ["", _int8_line(quantized)]
    lines += ["", "## Verification", verified, "", "## Limitations", *LIMITATIONS]
    return "\n".join(lines) + "\n"


def _fmt(value: object) -> str:
    return (
        f"{value:.4f}" if isinstance(value, float) else str(value if value is not None else "n/a")
    )


def _int8_line(q: dict) -> str:
    chosen = q.get("chosen", {})
    return (
        f"INT8 (`model_int8.onnx`, {chosen.get('scheme')} {chosen.get('method')} calibration): Dice "
        f"{q.get('dice_int8')} vs fp32 {q.get('dice_fp32')} (pooled over test voxels), CPM {q.get('cpm_int8')} "
        f"vs {q.get('cpm_fp32')}; latency {q.get('latency_ms_int8')} ms vs {q.get('latency_ms_fp32')} ms fp32 "
        f"per batch {q.get('latency_input_shape')} on {q.get('cpu', {}).get('model')} "
        f"({q.get('threads')} threads; from `metrics/quantize.json`)."
    )


def _metric_lines(evaluation: dict | None, source: str) -> list[str]:
    """A Markdown table of the evaluation; ``<key>_ci95`` pairs are shown next to ``<key>``."""
    if not evaluation:
        return [f"`{source}` was not available at export time; run the evaluate stage."]
    lines = [
        f"From `{source}` (95% bootstrap intervals where the evaluation computed them):",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key, value in evaluation.items():
        interval = evaluation.get(f"{key}_ci95")
        if key.endswith("_ci95") and key[: -len("_ci95")] in evaluation:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        if isinstance(interval, (list, tuple)) and len(interval) == 2:
            value = f"{value} (95% CI {interval[0]} to {interval[1]})"
        lines.append(f"| {key} | {value} |")
    return lines


def _read_optional(path: Path | None) -> dict | None:
    return read_json(path) if path is not None and path.is_file() else None


def build(
    model_path: Path,
    processed: Path,
    quant_dir: Path,
    stage: Path,
    cfg: dict,
    seed: int,
    evaluation: dict | None,
    quantized: dict | None,
) -> dict:
    """Write and verify the whole package in ``stage``; return the export metrics."""
    net, ckpt = nets.load_checkpoint(str(model_path))
    tp, threshold = ckpt["train_params"], float(cfg["threshold"])
    context, channels, opset = int(tp["context_slices"]), nets.in_channels(tp), int(cfg["opset"])
    torch.set_num_threads(onnxtools.resolve_threads(cfg["threads"]))
    start = time.perf_counter()
    _, program = onnxtools.export_onnx(
        net,
        channels,
        stage / "model.onnx",
        opset,
        {"ctpipe.context_slices": context, "ctpipe.labels": LABELS},
    )
    export_seconds = time.perf_counter() - start
    torch.export.save(program, str(stage / "model.pt2"))
    if onnxtools.onnx_opset(stage / "model.onnx") != opset:
        raise ValueError(
            f"{stage / 'model.onnx'}: opset {onnxtools.onnx_opset(stage / 'model.onnx')}, pinned {opset}"
        )

    batches = onnxtools.sample_slabs(processed, "val", context, cfg["parity_shapes"], seed)
    reference = onnxtools.module_predictor(net)
    onnx_session = onnxtools.ort_session(stage / "model.onnx", cfg["threads"])
    verification = {
        "atol": float(cfg["atol"]),
        "min_dice": float(cfg["min_dice"]),
        "threshold": threshold,
        "split": "val",
        "onnx_check": "onnx.checker.check_model(full_check=True): passed",
    }
    verification["onnx_vs_torch"] = onnxtools.assert_parity(
        onnxtools.parity_figures(reference, onnx_predictor(onnx_session), batches, threshold),
        float(cfg["atol"]),
        float(cfg["min_dice"]),
        "model.onnx vs PyTorch",
    )
    reloaded = onnxtools.module_predictor(torch.export.load(str(stage / "model.pt2")).module())
    verification["pt2_vs_torch"] = onnxtools.assert_parity(
        onnxtools.parity_figures(reference, reloaded, batches, threshold),
        float(cfg["atol"]),
        float(cfg["min_dice"]),
        "model.pt2 vs PyTorch",
    )

    shutil.copyfile(quant_dir / "model_int8.onnx", stage / "model_int8.onnx")
    onnx.checker.check_model(str(stage / "model_int8.onnx"), full_check=True)
    # Informative only: INT8 differs from fp32 by design; its gate is the quantize stage's Dice.
    int8 = onnx_predictor(onnxtools.ort_session(stage / "model_int8.onnx", cfg["threads"]))
    verification["int8_vs_onnx_fp32"] = onnxtools.parity_figures(
        onnx_predictor(onnx_session), int8, batches, threshold
    )

    triton = stage / "triton" / cfg["model_name"]
    (triton / "1").mkdir(parents=True)
    shutil.copyfile(stage / "model.onnx", triton / "1" / "model.onnx")
    (triton / "config.pbtxt").write_text(
        onnxtools.triton_config(cfg["model_name"], channels, int(cfg["triton_max_batch_size"])),
        encoding="utf-8",
    )

    spec = input_spec(ckpt, ckpt.get("plan") or data.load_plan(processed), cfg)
    versions = onnxtools.versions(opset)
    verification = onnxtools.significant(verification)
    write_json(stage / "input_spec.json", spec)
    write_json(stage / "versions.json", versions)
    write_json(stage / "verification.json", verification)
    (stage / "MODEL_CARD.md").write_text(
        model_card(ckpt, spec, verification, versions, cfg, processed, evaluation, quantized),
        encoding="utf-8",
    )
    onnxtools.write_sha256sums(stage)
    bad = onnxtools.verify_sha256sums(stage)
    if bad:
        raise RuntimeError(f"{stage}/{onnxtools.SUMS_FILE}: mismatch for {bad}")
    sizes = {
        f"size_bytes_{p.replace('.', '_')}": (stage / p).stat().st_size
        for p in ("model.onnx", "model_int8.onnx", "model.pt2")
    }
    return onnxtools.significant(
        {
            "opset": opset,
            "export_seconds": export_seconds,
            "total_seconds": time.perf_counter() - start,
            "parity_passed": True,
            "parity_shapes": [list(s) for s in cfg["parity_shapes"]],
            "onnx_max_abs_diff": verification["onnx_vs_torch"]["max_abs_diff"],
            "onnx_dice": verification["onnx_vs_torch"]["dice_min"],
            "pt2_max_abs_diff": verification["pt2_vs_torch"]["max_abs_diff"],
            "pt2_dice": verification["pt2_vs_torch"]["dice_min"],
            "int8_vs_fp32_dice": verification["int8_vs_onnx_fp32"]["dice"],
            "atol": float(cfg["atol"]),
            "min_dice": float(cfg["min_dice"]),
            "files": len(onnxtools.package_files(stage)) + 1,
            **sizes,
        }
    )


def run(
    model_path: Path,
    processed: Path,
    quant_dir: Path,
    out_dir: Path,
    cfg: dict,
    seed: int,
    evaluation: dict | None = None,
    quantized: dict | None = None,
) -> dict:
    """Build the package next to ``out_dir`` and swap it in only if every check passed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        result = build(model_path, processed, quant_dir, stage, cfg, seed, evaluation, quantized)
        os.chmod(stage, 0o755)  # mkdtemp makes it 0700
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(stage, out_dir)
        return result
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="trained model (models/model.pt)")
    parser.add_argument("data_dir", type=Path, help="preprocessed dataset (data/processed)")
    parser.add_argument("quant_dir", type=Path, help="quantize stage output (models/quantized)")
    parser.add_argument("out_dir", type=Path, help="the package (models/export)")
    parser.add_argument("--postprocessing", type=Path, required=True,
                        help="post-processing chosen on validation (models/postprocessing.json)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/export.json"))
    parser.add_argument("--evaluate-metrics", type=Path, default=Path("metrics/evaluate.json"))
    parser.add_argument("--quantize-metrics", type=Path, default=Path("metrics/quantize.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    onnxtools.quiet_exporter_logs()
    cfg, seed = stage_params("export", args.params, shared=("inference",))
    cfg.update(postprocess.load(args.postprocessing))
    record_environment("export", Path(args.metrics).parent / "env")
    result = run(
        args.model,
        args.data_dir,
        args.quant_dir,
        args.out_dir,
        cfg,
        seed,
        _read_optional(args.evaluate_metrics),
        _read_optional(args.quantize_metrics),
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


if __name__ == "__main__":
    sys.exit(main())
