"""ONNX export, real slabs, parity checks, ONNX Runtime sessions and packaging (export, quantize).

One export path serves both stages: :func:`export_onnx` runs ``torch.onnx.export(dynamo=True)``
with a pinned opset, input ``image`` ``[N, C, H, W]`` and output ``logits`` ``[N, 2, H, W]``,
batch and spatial dimensions dynamic (``H`` and ``W`` as multiples of :data:`SPATIAL_MULTIPLE`),
one self-contained file. The parity gate (:func:`parity_figures`, :func:`assert_parity`) compares
any two predictors on real slabs by max abs logit difference and by the Dice of their thresholded
predictions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from ctpipe.data import cases_in, load_case, load_index
from ctpipe.fileio import atomic_path
from ctpipe.infer import Predictor
from ctpipe.views import slabs
from ctpipe.nets import NUM_CLASSES

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
# BasicUNet halves the image four times and concatenates skips without cropping, so H and W must
# be multiples of 2**4; the export states this in its dynamic shapes (16 * h, 16 * w).
SPATIAL_MULTIPLE = 16
# The example input has batch 2: torch.export specialises a dimension of size 1 to a constant.
EXPORT_BATCH = 2
# Opset of graphs exported for internal use (evaluate's ONNX Runtime pass); export and quantize
# pin theirs in params.yaml.
DEFAULT_OPSET = 18
SUMS_FILE = "SHA256SUMS"
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ParityError(RuntimeError):
    """An exported model disagrees with its reference beyond the stated tolerances."""


# --------------------------------------------------------------------------------------------
# Export


def export_onnx(
    net: torch.nn.Module, channels: int, path: str | Path, opset: int, metadata: dict | None = None
) -> tuple[onnx.ModelProto, torch.export.ExportedProgram]:
    """Export ``net`` with the dynamo exporter to one self-contained ``.onnx`` file.

    Zero-padding ``Pad`` nodes (MONAI's odd-size guard in ``UpCat``, traced as constant zero
    pads) are removed: they copy every decoder tensor, and in a QDQ graph they keep ONNX Runtime
    from running the up-sampling in int8.

    Returns:
        The written model and the ``torch.export`` program it came from (for the ``.pt2``).
    """
    net = net.eval()
    batch = torch.export.Dim("batch", min=1)
    h, w = torch.export.Dim("h", min=1), torch.export.Dim("w", min=1)
    size = 4 * SPATIAL_MULTIPLE
    example = torch.randn(
        EXPORT_BATCH, channels, size, size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        program = torch.onnx.export(
            net,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamo=True,
            opset_version=int(opset),
            dynamic_shapes=({0: batch, 2: SPATIAL_MULTIPLE * h, 3: SPATIAL_MULTIPLE * w},),
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    removed = strip_noop_pads(model)
    log.info("exported opset %d, removed %d zero Pad nodes", opset, removed)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(
            key=str(key), value=value if isinstance(value, str) else json.dumps(value)
        )
    save_model(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    return model, program.exported_program


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Write ``model`` as one file (no external data), atomically."""
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)


def strip_noop_pads(model: onnx.ModelProto) -> int:
    """Remove ``Pad`` nodes whose pads are a constant all-zero initializer; return how many."""
    inits = {t.name: t for t in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        pads = inits.get(node.input[1]) if node.op_type == "Pad" and len(node.input) > 1 else None
        zero = pads is not None and not np.any(numpy_helper.to_array(pads))
        if zero and node.output[0] not in graph_outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
            continue
        kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {name for node in kept for name in node.input}
    unused = [t for t in model.graph.initializer if t.name not in used]
    for t in unused:
        model.graph.initializer.remove(t)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(rename)


def onnx_opset(path: str | Path) -> int:
    """The default-domain opset of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


# --------------------------------------------------------------------------------------------
# ONNX Runtime


def available_threads() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_threads(threads: int) -> int:
    """``threads`` if positive, else every CPU this process may use."""
    return int(threads) if int(threads) > 0 else available_threads()


def ort_session(
    path: str | Path, threads: int = 0, optimization: str = "all"
) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` with a fixed intra-op thread count and optimisation level.

    ``all`` matters on CPU: it adds the NCHWc layout for fp32 convolutions and the NHWC int8
    kernels (QLinearConv, QLinearConcat) that make a QDQ model faster than fp32.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPT_LEVELS[optimization]
    options.log_severity_level = 3  # ORT warns about removed initializers on every load
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def module_predictor(module: Callable[[torch.Tensor], torch.Tensor]) -> Predictor:
    """Wrap an eager or ``torch.export``-loaded module: float32 CPU logits, no autograd."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x).float().cpu()

    return run


# --------------------------------------------------------------------------------------------
# Real slabs (parity, calibration, selection)


def sample_slabs(
    processed: str | Path,
    split: str,
    context: int,
    shapes: Sequence[Sequence[int]],
    seed: int,
    fg_fraction: float = 1.0,
) -> list[np.ndarray]:
    """Batches of real 2.5D slabs ``[B, 2c+1, H, W]`` from one split only, one per shape."""
    return [x for x, _ in sample_patches(processed, split, context, shapes, seed, fg_fraction)]


def sample_patches(
    processed: str | Path,
    split: str,
    context: int,
    shapes: Sequence[Sequence[int]],
    seed: int,
    fg_fraction: float = 1.0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real 2.5D slabs ``[B, 2c+1, H, W]`` (float32) with their centre-slice labels ``[B, H, W]``.

    One batch per ``(B, H, W)`` in ``shapes``, every slab from a seeded case of ``split`` only; a
    fraction ``fg_fraction`` is centred on a nodule voxel (where the case has one), so predictions
    compared on them are not all background. Crops larger than the slice are padded with its
    minimum (air).
    """
    cases = cases_in(load_index(processed), split)
    if not cases:
        raise ValueError(f"{processed}/index.json: no cases in split '{split}'")
    rng = np.random.default_rng(seed)
    loaded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    batches = []
    for b, h, w in (tuple(int(v) for v in s) for s in shapes):
        batch = np.empty((b, 2 * context + 1, h, w), dtype=np.float32)
        labels = np.zeros((b, h, w), dtype=bool)
        for n in range(b):
            case_id = cases[int(rng.integers(len(cases)))]["case_id"]
            if case_id not in loaded:
                image, label, _ = load_case(processed, case_id)
                loaded[case_id] = (image, label, np.argwhere(np.asarray(label) > 0))
            image, label, fg = loaded[case_id]
            if len(fg) and rng.random() < fg_fraction:
                k, j, i = fg[int(rng.integers(len(fg)))]
            else:
                k, j, i = (int(rng.integers(s)) for s in image.shape)
            j0, i0 = int(j) - h // 2, int(i) - w // 2
            batch[n] = _crop(slabs(image, np.array([k]), context)[0], j0, i0, h, w)
            labels[n] = _crop(np.asarray(label[k : k + 1]) > 0, j0, i0, h, w)[0]
        batches.append((batch, labels))
    return batches


def _crop(slab: np.ndarray, j0: int, i0: int, h: int, w: int) -> np.ndarray:
    """``slab[:, j0:j0+h, i0:i0+w]``, shifted inside the slab where possible, else padded."""
    _, sh, sw = slab.shape
    j0 = min(max(j0, 0), max(sh - h, 0))
    i0 = min(max(i0, 0), max(sw - w, 0))
    out = slab[:, j0 : j0 + h, i0 : i0 + w]
    pad = ((0, 0), (0, h - out.shape[1]), (0, w - out.shape[2]))
    return np.pad(out, pad, constant_values=slab.min()) if any(p[1] for p in pad) else out


# --------------------------------------------------------------------------------------------
# Parity


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; 1.0 when both are empty (they agree perfectly)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def foreground(logits: np.ndarray, threshold: float) -> np.ndarray:
    """Nodule mask from logits ``[B, 2, H, W]``: softmax foreground probability above threshold."""
    prob = torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1)[:, 1]
    return prob.numpy() >= threshold


def parity_figures(
    reference: Predictor, candidate: Predictor, batches: Sequence[np.ndarray], threshold: float
) -> dict[str, Any]:
    """Compare two predictors batch by batch: max/mean abs logit difference and mask Dice.

    The Dice is over the masks of all batches together, and per shape.
    """
    per_shape, masks_ref, masks_cand = [], [], []
    for x in batches:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        ref, cand = reference(t).numpy(), candidate(t).numpy()
        if ref.shape != cand.shape:
            raise ParityError(f"output shape {cand.shape} differs from the reference {ref.shape}")
        diff = np.abs(ref.astype(np.float64) - cand)
        m_ref, m_cand = foreground(ref, threshold), foreground(cand, threshold)
        masks_ref.append(m_ref.ravel())
        masks_cand.append(m_cand.ravel())
        per_shape.append(
            {
                "shape": list(x.shape),
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
                "max_abs_logit": float(np.abs(ref).max()),
                "dice": dice(m_ref, m_cand),
                "foreground_voxels": int(m_ref.sum()),
            }
        )
    return {
        "shapes": per_shape,
        "max_abs_diff": max(s["max_abs_diff"] for s in per_shape),
        "dice": dice(np.concatenate(masks_ref), np.concatenate(masks_cand)),
        "dice_min": min(s["dice"] for s in per_shape),
        "foreground_voxels": sum(s["foreground_voxels"] for s in per_shape),
    }


def assert_parity(
    figures: dict[str, Any], atol: float, min_dice: float, what: str
) -> dict[str, Any]:
    """Raise :class:`ParityError` with the figures unless every shape is within both limits.

    Returns the figures with ``atol``, ``min_dice`` and ``passed`` added.
    """
    ok_diff = figures["max_abs_diff"] <= atol
    ok_dice = figures["dice_min"] >= min_dice
    out = {
        **figures,
        "atol": float(atol),
        "min_dice": float(min_dice),
        "passed": bool(ok_diff and ok_dice),
    }
    if not out["passed"]:
        shapes = "; ".join(
            f"{s['shape']}: max|diff| {s['max_abs_diff']:.3g}, Dice {s['dice']:.5f}"
            for s in figures["shapes"]
        )
        raise ParityError(
            f"{what}: parity gate failed (max |logit diff| {figures['max_abs_diff']:.3g} vs tolerance "
            f"{atol:.3g}; lowest Dice {figures['dice_min']:.5f} vs required {min_dice}): {shapes}"
        )
    log.info(
        "%s: parity ok (max |diff| %.3g <= %.3g, Dice %.5f >= %s)",
        what,
        figures["max_abs_diff"],
        atol,
        figures["dice_min"],
        min_dice,
    )
    return out


# --------------------------------------------------------------------------------------------
# Rounding, logs, versions


def significant(obj: Any, digits: int = 4) -> Any:
    """Round every float in a nested dict / list to ``digits`` significant figures.

    Unlike rounding to decimals, tiny parity differences (1e-7) keep their value.
    """
    if isinstance(obj, dict):
        return {k: significant(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [significant(v, digits) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(f"{float(obj):.{digits}g}")
    return obj


def quiet_exporter_logs() -> None:
    """The dynamo exporter's passes log every rewrite at INFO; keep the stage log readable."""
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)


def versions(opset: int | None = None) -> dict[str, Any]:
    """Versions of the runtime stack that produced (and can read) the artefacts."""
    import monai
    import onnxscript

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": ort.__version__,
        "monai": monai.__version__,
        "numpy": np.__version__,
        "platform": sys.platform,
    }
    if opset is not None:
        out["opset"] = int(opset)
    return out


# --------------------------------------------------------------------------------------------
# Packaging


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_files(root: str | Path) -> list[str]:
    """Every regular file under ``root`` except the checksum file, as sorted POSIX paths."""
    root = Path(root)
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(f for f in files if f != SUMS_FILE)


def write_sha256sums(root: str | Path) -> Path:
    """Write ``root/SHA256SUMS`` in ``sha256sum`` format (``sha256sum -c`` verifies it)."""
    root = Path(root)
    lines = [f"{sha256_file(root / rel)}  {rel}\n" for rel in package_files(root)]
    with atomic_path(root / SUMS_FILE) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return root / SUMS_FILE


def verify_sha256sums(root: str | Path) -> list[str]:
    """Files under ``root`` that are missing from, or differ from, ``SHA256SUMS`` (empty: all ok)."""
    root = Path(root)
    listed = {}
    for line in (root / SUMS_FILE).read_text(encoding="utf-8").splitlines():
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    bad = [
        rel
        for rel, digest in listed.items()
        if not (root / rel).is_file() or sha256_file(root / rel) != digest
    ]
    return sorted(bad + [rel for rel in package_files(root) if rel not in listed])


def triton_config(name: str, channels: int, max_batch_size: int) -> str:
    """``config.pbtxt`` for Triton's onnxruntime backend; -1 marks the dynamic H and W.

    With ``max_batch_size > 0`` Triton owns the batch dimension, so ``dims`` omit it.
    """
    return (
        f"# H and W are dynamic but must be multiples of {SPATIAL_MULTIPLE} (see input_spec.json)\n"
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {int(max_batch_size)}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {int(channels)}, -1, -1 ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{OUTPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {NUM_CLASSES}, -1, -1 ]\n"
        "  }\n"
        "]\n"
        "dynamic_batching { }\n"
    )
