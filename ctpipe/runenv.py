"""What a stage ran on: package versions, device, git revision. Written next to its metrics.

Kept out of the metrics JSON themselves so that ``dvc metrics diff`` compares numbers only, and so
that two runs on different machines can still have identical metrics.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from ctpipe.fileio import write_json

PACKAGES = ("ctpipe", "torch", "torchvision", "monai", "numpy", "SimpleITK", "pydicom", "highdicom",
            "scikit-learn", "pandas", "onnx", "onnxruntime", "dvc", "dvclive")


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _device() -> dict:
    try:
        import torch
    except ImportError:
        return {"kind": "cpu"}
    if torch.cuda.is_available():
        return {"kind": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda}
    return {"kind": "cpu", "torch_threads": torch.get_num_threads()}


def environment() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": _device(),
        "packages": versions,
        "git_revision": _git("rev-parse", "HEAD"),
        "git_dirty": _git("status", "--porcelain", "--untracked-files=no") not in ("", "unknown"),
    }


def record(stage: str, directory: str | Path = "metrics/env") -> None:
    """Write ``<directory>/<stage>.json`` describing this run's environment."""
    write_json(Path(directory) / f"{stage}.json", {"stage": stage, **environment()})
