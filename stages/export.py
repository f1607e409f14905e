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

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import onnx
import torch

from ctpipe.deploy import card, onnx_export, package, parity, sessions
from ctpipe.fileio import read_json, write_json
from ctpipe.model import data, nets
from ctpipe.model.infer import onnx_predictor
from ctpipe.params import add_model_inputs, setup_logging, stage_params, stage_parser
from ctpipe.postprocessing import choose
from ctpipe.runenv import record as record_environment
from ctpipe.safepath import UnsafePath, inside, name_component

log = logging.getLogger("export")
LABELS = {"0": "background", "1": "nodule"}


def _inference_spec(tp: dict, cfg: dict) -> dict:
    """How the package's predict runs the network over a volume."""
    return {
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
        "lung_margin_mm": None if cfg["lung_margin_mm"] is None else float(cfg["lung_margin_mm"]),
        "lung_margin_mm_meaning": "only the bounding box of the lungs (voxels at or below the body "
        "threshold inside the body, each slice's holes filled; pieces under 1 % of the largest left out), "
        "grown by this margin, is predicted; probability 0 outside it; null: the whole volume",
        "whole_slab": bool(cfg["whole_slab"]),
        "whole_slab_meaning": "true: each slab goes through the network in one pass, zero-padded to "
        "multiples of 16 (roi_size and sliding_window_overlap unused); false: windows of roi_size at "
        "sliding_window_overlap",
        "blending": "gaussian (sliding windows)",
        "padding": "slabs smaller than the window are zero-padded (MONAI sliding_window_inference)",
    }


def _postprocessing_spec(cfg: dict) -> dict:
    """From probabilities to the nodule mask and the listed nodules."""
    return {
        "softmax": "over the class axis; foreground = channel 1",
        "threshold": float(cfg["threshold"]),
        "component_threshold": float(cfg["component_threshold"]),
        "connected_components": "26-connected, on the stacked 3D probability",
        "mask": "voxels >= threshold, in components of at least min_candidate_mm3 whose highest probability "
        "is >= component_threshold; the nodules listed are those components, one row each",
        "min_candidate_mm3": float(cfg["min_candidate_mm3"]),
        "chosen_on": "threshold, component_threshold, shape_weight chosen on the "
        "validation split after training (postprocess stage, models/postprocessing.json)",
        "shape_weight": float(cfg["shape_weight"]),
        "score": "each nodule's score is its peak probability p with the odds divided by its elongation e "
        "(sqrt of the largest over the smallest eigenvalue of its second moments in mm) to the power "
        "shape_weight: p / (p + (1 - p) * e ** shape_weight); shape_weight 0: the peak",
    }


def accepted_input(plan: dict, cfg: dict) -> dict:
    """What predict accepts: finer spacings than training are resampled to the plan; what the
    model cannot see (much coarser slices, a partial scan, another modality) is refused."""
    fingerprint = plan.get("fingerprint", {})
    coarsest = fingerprint.get("spacing_max", [1e9] * 3)
    factor = float(cfg["max_spacing_factor"])
    return {
        "modalities": ["CT"],
        "max_spacing_mm": [round(factor * float(s), 3) for s in coarsest],
        "min_extent_mm": float(cfg["min_extent_mm"]),
        "training_spacing_range_mm": [fingerprint.get("spacing_min", [0.0] * 3), coarsest],
        "rule": "a CT series of any finer spacing is resampled to target_spacing_mm_xyz; it is refused "
        "when a spacing is coarser than max_spacing_mm (max_spacing_factor times the coarsest "
        "spacing seen in training), when it covers less than min_extent_mm along the slice normal, "
        "when it is a localizer or not an image of a listed modality, or when ingest's series checks "
        "fail (missing or duplicate slices, gantry tilt, mixed orientations)",
    }


def input_spec(ckpt: dict, plan: dict, cfg: dict) -> dict:
    """How to feed the model and read its output, from the checkpoint, the plan and the params."""
    tp = ckpt["train_params"]
    context = int(tp["context_slices"])
    return {
        "input": {
            "name": onnx_export.INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["N", nets.in_channels(tp), "H", "W"],
            "channels": f"2.5D slab: slices k-{context}..k+{context} of the volume (edge slices "
            "replicated), centre slice in the middle channel",
            "spatial_multiple": onnx_export.SPATIAL_MULTIPLE,
            "dynamic": ["N", "H", "W"],
        },
        "output": {
            "name": onnx_export.OUTPUT_NAME,
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
        "inference": _inference_spec(tp, cfg),
        "postprocessing": _postprocessing_spec(cfg),
        "deep_supervision": False,
        # What predict accepts: the modality and the range of acquisition spacings seen in training.
        "accepted_input": accepted_input(plan, cfg),
    }


def _read_optional(path: Path | None) -> dict | None:
    return read_json(path) if path is not None and path.is_file() else None


def export_graphs(
    net: torch.nn.Module, channels: int, context: int, opset: int, stage: Path
) -> None:
    """``model.onnx`` (checked, at the pinned opset) and ``model.pt2`` from one ``torch.export``."""
    _, program = onnx_export.export_onnx(
        net,
        channels,
        stage / "model.onnx",
        opset,
        {"ctpipe.context_slices": context, "ctpipe.labels": LABELS},
    )
    torch.export.save(program, str(stage / "model.pt2"))
    found = onnx_export.onnx_opset(stage / "model.onnx")
    if found != opset:
        raise ValueError(f"{stage / 'model.onnx'}: opset {found}, pinned {opset}")


def verify(net: torch.nn.Module, stage: Path, quant_dir: Path, batches: list, cfg: dict) -> dict:
    """The parity gates (ONNX and ``.pt2`` against PyTorch) and, for information, INT8 against fp32."""
    threshold, atol, min_dice = float(cfg["threshold"]), float(cfg["atol"]), float(cfg["min_dice"])
    reference = parity.module_predictor(net)
    onnx_session = sessions.ort_session(stage / "model.onnx", cfg["threads"])
    verification = {
        "atol": atol,
        "min_dice": min_dice,
        "threshold": threshold,
        "split": "val",
        "onnx_check": "onnx.checker.check_model(full_check=True): passed",
    }
    verification["onnx_vs_torch"] = parity.assert_parity(
        parity.parity_figures(reference, onnx_predictor(onnx_session), batches, threshold),
        atol,
        min_dice,
        "model.onnx vs PyTorch",
    )
    reloaded = parity.module_predictor(torch.export.load(str(stage / "model.pt2")).module())
    verification["pt2_vs_torch"] = parity.assert_parity(
        parity.parity_figures(reference, reloaded, batches, threshold),
        atol,
        min_dice,
        "model.pt2 vs PyTorch",
    )
    shutil.copyfile(quant_dir / "model_int8.onnx", stage / "model_int8.onnx")
    onnx.checker.check_model(str(stage / "model_int8.onnx"), full_check=True)
    # Informative only: INT8 differs from fp32 by design; its gate is the quantize stage's Dice.
    int8 = onnx_predictor(sessions.ort_session(stage / "model_int8.onnx", cfg["threads"]))
    verification["int8_vs_onnx_fp32"] = parity.parity_figures(
        onnx_predictor(onnx_session), int8, batches, threshold
    )
    return package.significant(verification)


def add_triton(stage: Path, cfg: dict, channels: int) -> None:
    """``triton/<name>/config.pbtxt`` and ``1/model.onnx``: a Triton model repository entry."""
    triton = inside(stage, stage / "triton" / model_folder(cfg))
    (triton / "1").mkdir(parents=True)
    shutil.copyfile(stage / "model.onnx", triton / "1" / "model.onnx")
    (triton / "config.pbtxt").write_text(
        package.triton_config(cfg["model_name"], channels, int(cfg["triton_max_batch_size"])),
        encoding="utf-8",
    )


def model_folder(cfg: dict) -> str:
    """``export.model_name``, which names the Triton model's folder, or :class:`UnsafePath`."""
    try:
        return name_component(cfg["model_name"])
    except UnsafePath as err:
        raise UnsafePath(f"params export.model_name: {err}") from None


def export_metrics(stage: Path, verification: dict, cfg: dict, opset: int, seconds: dict) -> dict:
    """metrics/export.json: parity figures, sizes, timings."""
    sizes = {
        f"size_bytes_{p.replace('.', '_')}": (stage / p).stat().st_size
        for p in ("model.onnx", "model_int8.onnx", "model.pt2")
    }
    return package.significant(
        {
            "opset": opset,
            **seconds,
            "parity_passed": True,
            "parity_shapes": [list(s) for s in cfg["parity_shapes"]],
            "onnx_max_abs_diff": verification["onnx_vs_torch"]["max_abs_diff"],
            "onnx_dice": verification["onnx_vs_torch"]["dice_min"],
            "pt2_max_abs_diff": verification["pt2_vs_torch"]["max_abs_diff"],
            "pt2_dice": verification["pt2_vs_torch"]["dice_min"],
            "int8_vs_fp32_dice": verification["int8_vs_onnx_fp32"]["dice"],
            "atol": float(cfg["atol"]),
            "min_dice": float(cfg["min_dice"]),
            "files": len(package.package_files(stage)) + 1,
            **sizes,
        }
    )


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
    tp = ckpt["train_params"]
    context, channels, opset = int(tp["context_slices"]), nets.in_channels(tp), int(cfg["opset"])
    torch.set_num_threads(sessions.resolve_threads(cfg["threads"]))
    start = time.perf_counter()
    export_graphs(net, channels, context, opset, stage)
    export_seconds = time.perf_counter() - start
    batches = parity.sample_slabs(processed, "val", context, cfg["parity_shapes"], seed)
    verification = verify(net, stage, quant_dir, batches, cfg)
    add_triton(stage, cfg, channels)
    spec = input_spec(ckpt, ckpt.get("plan") or data.load_plan(processed), cfg)
    versions = package.versions(opset)
    write_json(stage / "input_spec.json", spec)
    write_json(stage / "versions.json", versions)
    write_json(stage / "verification.json", verification)
    (stage / "MODEL_CARD.md").write_text(
        card.model_card(ckpt, spec, verification, versions, cfg, processed, evaluation, quantized),
        encoding="utf-8",
    )
    package.write_sha256sums(stage)
    bad = package.verify_sha256sums(stage)
    if bad:
        raise RuntimeError(f"{stage}/{package.SUMS_FILE}: mismatch for {bad}")
    seconds = {"export_seconds": export_seconds, "total_seconds": time.perf_counter() - start}
    return export_metrics(stage, verification, cfg, opset, seconds)


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
    """Build the package next to ``out_dir`` and swap it in only if every check passed.

    Raises:
        UnsafePath: before any work, when ``out_dir`` is not a folder inside its parent (``x/..``,
            a link out) or ``export.model_name`` is not a folder name.
    """
    model_folder(cfg)
    inside(out_dir.parent, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        result = build(model_path, processed, quant_dir, stage, cfg, seed, evaluation, quantized)
        os.chmod(stage, 0o755)  # mkdtemp makes it 0700
        if out_dir.exists():
            shutil.rmtree(inside(out_dir.parent, out_dir))
        os.replace(stage, inside(out_dir.parent, out_dir))
        return result
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "export")
    add_model_inputs(parser)
    parser.add_argument("quant_dir", type=Path, help="quantize stage output (models/quantized)")
    parser.add_argument("out_dir", type=Path, help="the package (models/export)")
    parser.add_argument(
        "--evaluate-metrics",
        type=Path,
        default=None,
        help="test figures for the model card (dvc.yaml: metrics/evaluate.json)",
    )
    parser.add_argument(
        "--quantize-metrics",
        type=Path,
        default=None,
        help="INT8 figures for the model card (dvc.yaml: metrics/quantize.json)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    onnx_export.quiet_exporter_logs()
    cfg, seed = stage_params("export", args.params, shared=("inference",))
    cfg.update(choose.load(args.postprocessing))
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
