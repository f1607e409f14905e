"""The model card written into the package: ``model_card.md`` filled with this model's figures.

The prose (intended use, limitations) is the template; what changes with the model (network,
data version, metrics, verification) is filled in by :func:`model_card`.
"""

from __future__ import annotations

import hashlib
import string
from importlib import resources
from pathlib import Path

import yaml

from ctpipe.config import Export
from ctpipe.model import data
from ctpipe.runenv import git_revision

TEMPLATE = "model_card.md"


def data_version(processed: Path) -> dict:
    """Cheap identifiers of the training data and code: index hash, DVC lock entry, git revision."""
    out = {
        "index_sha256_16": hashlib.sha256((processed / "index.json").read_bytes()).hexdigest()[:16]
    }
    lock = Path("dvc.lock")
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
        for entry in stages.get("preprocess", {}).get("outs", []):
            if Path(entry.get("path", "")).name == processed.name:
                out["dvc_md5"] = entry.get("md5")
    revision = git_revision()
    if revision != "unknown":
        out["git_revision"] = revision
    return out


def model_card(
    ckpt: dict,
    spec: dict,
    verification: dict,
    versions: dict,
    export: Export,
    processed: Path,
    evaluation: dict | None,
    quantized: dict | None,
    quantize_env: dict | None = None,
) -> str:
    """MODEL_CARD.md: intended use, data, metrics with intervals, verification, limitations.

    ``quantized`` and ``quantize_env``: the quantize stage's figures and its environment record
    (the CPU its latencies were measured on)."""
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
        f"{export.training_data}. Cases: {splits['train']} train / {splits['val']} val / {splits['test']} test "
        f"(split by patient). Data version: index sha256 `{version['index_sha256_16']}`"
        + (f", DVC md5 `{version['dvc_md5']}`" if version.get("dvc_md5") else "")
        + (
            f"; code revision `{version['git_revision']}` at export time"
            if version.get("git_revision")
            else ""
        )
        + f". Training: {tp.get('epochs')} epochs, patch {tp.get('patch_size')}; the model is the "
        f"weights after the last epoch (epoch {ckpt.get('epoch', -1) + 1}), averaged with decay "
        f"{tp.get('ema_decay', 0)}"
        + "; post-processing chosen on validation (evaluate's own inference)."
    )
    fig = verification["onnx_vs_torch"]
    verified = (
        f"ONNX Runtime vs PyTorch on real validation slabs {[s['shape'] for s in fig['shapes']]}: max |logit "
        f"diff| {fig['max_abs_diff']:.2e} (tolerance {fig['atol']}), Dice {fig['dice_min']:.5f} (required "
        f"{fig['min_dice']}); `model.pt2` likewise. Details: `verification.json`; integrity: "
        "`sha256sum -c SHA256SUMS`."
    )
    metrics = _metric_lines(evaluation, "metrics/evaluate.json")
    if quantized:
        metrics += ["", _int8_line(quantized, quantize_env or {})]
    template = resources.files("ctpipe.deploy").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return string.Template(template).substitute(
        name=export.model_name,
        model=model,
        training_data=data_text,
        metrics="\n".join(metrics),
        verification=verified,
    )


def _int8_line(q: dict, env: dict) -> str:
    chosen = q.get("chosen", {})
    return (
        f"INT8 (`model_int8.onnx`, {chosen.get('scheme')} {chosen.get('method')} calibration): Dice "
        f"{q.get('dice_int8')} vs fp32 {q.get('dice_fp32')} (pooled over test voxels), CPM {q.get('cpm_int8')} "
        f"vs {q.get('cpm_fp32')}; latency {q.get('latency_ms_int8')} ms vs {q.get('latency_ms_fp32')} ms fp32 "
        f"per batch {q.get('latency_input_shape')} on {env.get('cpu', {}).get('model', 'a CPU')} "
        f"({q.get('threads')} threads; from `metrics/quantize.json` and `metrics/env/quantize.json`)."
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
