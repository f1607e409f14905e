"""The deployable model package, built and verified in a temporary folder and swapped into place.

``model.onnx`` is the train stage's fp32 export (``models/model.onnx``) copied as it is, after its
opset (:data:`ctpipe.deploy.onnx_export.OPSET`) and ``onnx.checker``'s full check;
``model_int8.onnx`` is the quantize stage's; ``model.pt2`` is a ``torch.export`` of the checkpoint.
Gate: ONNX Runtime and the reloaded ``.pt2`` against PyTorch on real validation slabs of every
:data:`ctpipe.deploy.parity.PARITY_SHAPES`: max |logit difference| <= ``export.atol`` and Dice of
the thresholded predictions >= ``export.min_dice``; otherwise :class:`ParityError` with the figures
and nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from ctpipe import malignancy
from ctpipe.classifier import ONNX_INPUT, CandidateClassifier, probabilities
from ctpipe.config import Export, Inference
from ctpipe.deploy import card, onnx_export, package, parity, sessions, spec
from ctpipe.fileio import write_json
from ctpipe.model import data, nets
from ctpipe.model.infer import onnx_predictor
from ctpipe.postprocessing.candidates import Chosen
from ctpipe.safepath import UnsafePath, inside, name_component


@dataclass(frozen=True)
class Inputs:
    """What the package is made of: the trained model (checkpoint and its ONNX export), the data
    it was trained on, the INT8 model, and the reports the model card quotes (None: absent)."""

    model: Path  # models/model.pt
    onnx: Path  # models/model.onnx
    processed: Path  # data/processed
    quant_dir: Path  # models/quantized
    chosen: Chosen  # models/postprocessing.json (ctpipe.postprocessing.choose.load)
    evaluation: dict | None = None  # metrics/evaluate.json
    quantized: dict | None = None  # metrics/quantize.json
    quantize_env: dict | None = None  # metrics/env/quantize.json
    classifier: Path | None = None  # models/classifier.pt (None: the segmentation alone)
    malignancy: Path | None = None  # models/malignancy.json (None, or no model in it: none)


def export_package(
    inputs: Inputs, out_dir: Path, export: Export, inference: Inference, seed: int
) -> dict:
    """Build the package next to ``out_dir`` and swap it in only if every check passed; return
    the figures of ``metrics/export.json``. ``inference`` goes into ``input_spec.json``; ``seed``
    draws the validation slabs of the parity gate.

    Raises:
        UnsafePath: before any work, when ``out_dir`` is not a folder inside its parent (``x/..``,
            a link out) or ``export.model_name`` is not a folder name.
        ValueError: ``model.onnx`` has another opset than :data:`onnx_export.OPSET`.
        ParityError: a parity gate failed.
    """
    model_folder(export.model_name)
    inside(out_dir.parent, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        result = build(inputs, stage, export, inference, seed)
        os.chmod(stage, 0o755)  # mkdtemp makes it 0700
        if out_dir.exists():
            shutil.rmtree(inside(out_dir.parent, out_dir))
        os.replace(stage, inside(out_dir.parent, out_dir))
        return result
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def build(inputs: Inputs, stage: Path, export: Export, inference: Inference, seed: int) -> dict:
    """Write and verify the whole package in ``stage``; return the export metrics."""
    net, ckpt = nets.load_checkpoint(str(inputs.model))
    tp = ckpt["train_params"]
    context, channels = tp["context_slices"], nets.in_channels(tp)
    torch.set_num_threads(sessions.resolve_threads(export.threads))
    start = time.perf_counter()
    add_graphs(net, channels, inputs.onnx, stage)
    export_seconds = time.perf_counter() - start
    batches = parity.sample_slabs(inputs.processed, "val", context, parity.PARITY_SHAPES, seed)
    verification = verify(net, stage, inputs.quant_dir, batches, export, inputs.chosen.threshold)
    add_triton(stage, export.model_name, channels)
    plan = ckpt.get("plan") or data.load_plan(inputs.processed)
    input_spec = spec.input_spec(ckpt, plan, export, inference, inputs.chosen)
    if inputs.classifier is not None:
        second = CandidateClassifier.load(inputs.classifier)
        verification["classifier_onnx_vs_torch"] = add_classifier(second, stage, export, seed)
        input_spec["classifier"] = spec.classifier_spec(second)
    third = None if inputs.malignancy is None else malignancy.load_optional(inputs.malignancy)
    if third is not None:  # a few numbers: they travel in the spec, with nothing to export
        input_spec["malignancy"] = dataclasses.asdict(third)
    versions = package.versions(onnx_export.OPSET)
    write_json(stage / "input_spec.json", input_spec)
    write_json(stage / "versions.json", versions)
    write_json(stage / "verification.json", verification)
    (stage / "MODEL_CARD.md").write_text(
        card.model_card(
            ckpt,
            input_spec,
            verification,
            versions,
            export,
            inputs.processed,
            inputs.evaluation,
            inputs.quantized,
            inputs.quantize_env,
        ),
        encoding="utf-8",
    )
    package.write_sha256sums(stage)
    bad = package.verify_sha256sums(stage)
    if bad:
        raise RuntimeError(f"{stage}/{package.SUMS_FILE}: mismatch for {bad}")
    seconds = {"export_seconds": export_seconds, "total_seconds": time.perf_counter() - start}
    return export_metrics(stage, verification, export, seconds)


def add_graphs(net: torch.nn.Module, channels: int, onnx_path: Path, stage: Path) -> None:
    """``model.onnx`` (train's export, checked: the opset, ``onnx.checker`` in full) and
    ``model.pt2`` (``torch.export`` with the same dynamic shapes)."""
    onnx_export.check_opset(onnx_path)
    shutil.copyfile(onnx_path, stage / "model.onnx")
    onnx.checker.check_model(str(stage / "model.onnx"), full_check=True)
    torch.export.save(onnx_export.export_program(net, channels), str(stage / "model.pt2"))


def add_classifier(model: CandidateClassifier, stage: Path, export: Export, seed: int) -> dict:
    """``classifier.onnx``, checked in full and against PyTorch on random crops: max |probability
    difference| <= ``export.atol``, else :class:`~ctpipe.deploy.parity.ParityError`."""
    path = stage / "classifier.onnx"
    model.export_onnx(path, onnx_export.OPSET)
    onnx.checker.check_model(str(path), full_check=True)
    crops = np.random.default_rng(seed).normal(size=(64, *model.shape)).astype(np.float32)
    session = sessions.ort_session(path, export.threads)
    logits = session.run(None, {ONNX_INPUT: crops[:, None]})[0][:, 0].astype(np.float64)
    diff = float(np.abs(1 / (1 + np.exp(-logits)) - probabilities(model.net, crops)).max())
    if not diff <= export.atol:
        raise parity.ParityError(
            f"classifier.onnx vs PyTorch: max |probability difference| {diff:.3g} > {export.atol}"
        )
    return {"crops": len(crops), "max_abs_prob_diff": diff}


def verify(
    net: torch.nn.Module,
    stage: Path,
    quant_dir: Path,
    batches: list,
    export: Export,
    threshold: float,
) -> dict:
    """The parity gates (ONNX and ``.pt2`` against PyTorch) and, for information, INT8 against fp32."""
    reference = parity.module_predictor(net)
    onnx_session = sessions.ort_session(stage / "model.onnx", export.threads)
    verification = {
        "atol": export.atol,
        "min_dice": export.min_dice,
        "threshold": threshold,
        "split": "val",
        "onnx_check": "onnx.checker.check_model(full_check=True): passed",
    }
    verification["onnx_vs_torch"] = parity.assert_parity(
        parity.parity_figures(reference, onnx_predictor(onnx_session), batches, threshold),
        export.atol,
        export.min_dice,
        "model.onnx vs PyTorch",
    )
    reloaded = parity.module_predictor(torch.export.load(str(stage / "model.pt2")).module())
    verification["pt2_vs_torch"] = parity.assert_parity(
        parity.parity_figures(reference, reloaded, batches, threshold),
        export.atol,
        export.min_dice,
        "model.pt2 vs PyTorch",
    )
    shutil.copyfile(quant_dir / "model_int8.onnx", stage / "model_int8.onnx")
    onnx.checker.check_model(str(stage / "model_int8.onnx"), full_check=True)
    # Informative only: INT8 differs from fp32 by design; its gate is the quantize stage's Dice.
    int8 = onnx_predictor(sessions.ort_session(stage / "model_int8.onnx", export.threads))
    verification["int8_vs_onnx_fp32"] = parity.parity_figures(
        onnx_predictor(onnx_session), int8, batches, threshold
    )
    return package.significant(verification)


def add_triton(stage: Path, model_name: str, channels: int) -> None:
    """``triton/<name>/config.pbtxt`` and ``1/model.onnx``: a Triton model repository entry."""
    triton = inside(stage, stage / "triton" / model_folder(model_name))
    (triton / "1").mkdir(parents=True)
    shutil.copyfile(stage / "model.onnx", triton / "1" / "model.onnx")
    (triton / "config.pbtxt").write_text(
        package.triton_config(model_name, channels), encoding="utf-8"
    )


def model_folder(model_name: str) -> str:
    """``export.model_name``, which names the Triton model's folder, or :class:`UnsafePath`."""
    try:
        return name_component(model_name)
    except UnsafePath as err:
        raise UnsafePath(f"params export.model_name: {err}") from None


def export_metrics(stage: Path, verification: dict, export: Export, seconds: dict) -> dict:
    """metrics/export.json: parity figures, sizes, timings."""
    sizes = {
        f"size_bytes_{p.replace('.', '_')}": (stage / p).stat().st_size
        for p in ("model.onnx", "model_int8.onnx", "model.pt2")
    }
    return package.significant(
        {
            "opset": onnx_export.OPSET,
            **seconds,
            "parity_passed": True,
            "parity_shapes": [list(s) for s in parity.PARITY_SHAPES],
            "onnx_max_abs_diff": verification["onnx_vs_torch"]["max_abs_diff"],
            "onnx_dice": verification["onnx_vs_torch"]["dice_min"],
            "pt2_max_abs_diff": verification["pt2_vs_torch"]["max_abs_diff"],
            "pt2_dice": verification["pt2_vs_torch"]["dice_min"],
            "int8_vs_fp32_dice": verification["int8_vs_onnx_fp32"]["dice"],
            "atol": export.atol,
            "min_dice": export.min_dice,
            "files": len(package.package_files(stage)) + 1,
            **sizes,
        }
    )
