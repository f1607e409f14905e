"""What a stage ran on: package versions, CPU, device, git revision; the one place they are read.

:func:`record` writes them next to a stage's metrics (``metrics/env/<stage>.json``), with the
conditions of the stage's measurements where it has any (quantize: the load average around its
timings, what its Dice figure is pooled over); the model package uses :func:`package_versions` and
:func:`git_revision`.

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

PACKAGES = (
    "ctpipe",
    "torch",
    "torchvision",
    "monai",
    "numpy",
    "SimpleITK",
    "pydicom",
    "highdicom",
    "scikit-learn",
    "pandas",
    "onnx",
    "onnxruntime",
    "dvc",
    "dvclive",
)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_revision() -> str:
    """The commit checked out here (``git rev-parse HEAD``: packed refs and worktrees included), or
    ``unknown`` outside a git checkout."""
    return _git("rev-parse", "HEAD")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (``importlib.metadata``); None for one not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# Instruction-set extensions that decide which kernels oneDNN (PyTorch on the CPU) and ONNX Runtime
# dispatch to; two CPUs that differ here compute a training step with other roundings.
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """CPU model name and the :data:`ISA_FLAGS` it has (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():  # the first processor's entry is enough: all cores are alike
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    return {
        "model": model,
        "machine": platform.machine(),
        "cpus_available": available_cpus(),
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
    }


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _device() -> dict:
    try:
        import torch
    except ImportError:
        return {"kind": "cpu"}
    if torch.cuda.is_available():
        return {
            "kind": "cuda",
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
        }
    return {
        "kind": "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "device": _device(),
        "packages": package_versions(),
        "git_revision": git_revision(),
        "git_dirty": _git("status", "--porcelain", "--untracked-files=no") not in ("", "unknown"),
    }


def record(
    stage: str, directory: str | Path = "metrics/env", conditions: dict | None = None
) -> None:
    """Write ``<directory>/<stage>.json`` describing this run's environment, and under
    ``conditions`` what the stage measured its figures under (omitted when None)."""
    env = {"stage": stage, **environment()}
    if conditions is not None:
        env["conditions"] = conditions
    write_json(Path(directory) / f"{stage}.json", env)
