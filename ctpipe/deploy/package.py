"""The model package: SHA256SUMS, the Triton model configuration, rounding of reported figures."""

from __future__ import annotations

import hashlib
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ctpipe.deploy.onnx_export import INPUT_NAME, OUTPUT_NAME, SPATIAL_MULTIPLE
from ctpipe.fileio import atomic_path
from ctpipe.model.nets import NUM_CLASSES
from ctpipe.runenv import package_versions

SUMS_FILE = "SHA256SUMS"
TRITON_MAX_BATCH_SIZE = 16  # Triton's max_batch_size (Triton owns the batch dim; H and W stay -1)
RUNTIME_PACKAGES = ("torch", "onnx", "onnxscript", "onnxruntime", "monai", "numpy")


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


def versions(opset: int | None = None) -> dict[str, Any]:
    """Versions of the runtime stack that produced (and can read) the artefacts."""
    out = {
        "python": platform.python_version(),
        **package_versions(RUNTIME_PACKAGES),
        "platform": sys.platform,
    }
    if opset is not None:
        out["opset"] = int(opset)
    return out


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


def triton_config(name: str, channels: int, max_batch_size: int = TRITON_MAX_BATCH_SIZE) -> str:
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
