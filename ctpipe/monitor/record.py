"""One record per series that predict or serve processed, with no PHI (no UID, name or date):
acquisition, intensity statistics and the model's outputs. Written append-only, one JSON file per
series, so several processes can write into one folder."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from ctpipe.fileio import write_json
from ctpipe.safepath import inside

SAMPLE = 10000  # voxels per region, seeded (as preprocess's fingerprint_voxels)
BODY_HU = -500.0  # preprocess's body_threshold_hu: body voxels are above it
LUNG_HU = (-950.0, -600.0)  # aerated lung parenchyma (outside air, about -1000, excluded)
NUMERIC = (
    "spacing_x_mm",
    "spacing_y_mm",
    "spacing_z_mm",
    "slices",
    "kvp",
    "body_hu_mean",
    "body_hu_std",
    "body_hu_p05",
    "body_hu_p50",
    "body_hu_p95",
    "lung_hu_mean",
    "lung_hu_std",
    "lung_hu_p50",
    "candidates",
    "top_score",
    "nodule_volume_mm3",
    "inference_seconds",
)
CATEGORICAL = ("kernel", "manufacturer", "model", "contrast")


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
        return "\\".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value or "")
    except (ValueError, TypeError):
        return ""


def _number(ds: pydicom.Dataset, keyword: str) -> float | None:
    try:
        return float(ds.get(keyword))
    except (TypeError, ValueError):
        return None


def _stats(values: np.ndarray, prefix: str, rng: np.random.Generator, percentiles: dict) -> dict:
    if values.size == 0:
        return {f"{prefix}_{k}": None for k in ("mean", "std", *percentiles)}
    sample = rng.choice(values, min(SAMPLE, values.size), replace=False).astype(np.float64)
    out = {f"{prefix}_mean": float(sample.mean()), f"{prefix}_std": float(sample.std())}
    out.update({f"{prefix}_{k}": float(np.percentile(sample, q)) for k, q in percentiles.items()})
    return out


def input_features(first: pydicom.Dataset, hu: np.ndarray, spacing) -> dict:
    """Acquisition and intensity features of one series (``hu``: the volume in HU)."""
    rng = np.random.default_rng(0)
    flat = hu.ravel()
    out = {
        "spacing_x_mm": float(spacing[0]),
        "spacing_y_mm": float(spacing[1]),
        "spacing_z_mm": float(spacing[2]),
        "slices": int(hu.shape[0]),
        "kvp": _number(first, "KVP"),
        "kernel": _text(first, "ConvolutionKernel") or "unknown",
        "manufacturer": _text(first, "Manufacturer") or "unknown",
        "model": _text(first, "ManufacturerModelName") or "unknown",
        "contrast": "yes" if _text(first, "ContrastBolusAgent") else "no",
    }
    out.update(_stats(flat[flat > BODY_HU], "body_hu", rng, {"p05": 5, "p50": 50, "p95": 95}))
    lung = flat[(flat > LUNG_HU[0]) & (flat < LUNG_HU[1])]
    out.update(_stats(lung, "lung_hu", rng, {"p50": 50}))
    return out


def synthetic_features(case) -> dict:
    """Input features of a case of :mod:`ctpipe.synth` (in memory, no DICOM round trip): the
    header the generator writes (kVp 120, manufacturer SYNTHETIC, the kernel when set)."""
    header = pydicom.Dataset()
    header.KVP, header.Manufacturer = "120", "SYNTHETIC"
    if case.kernel:
        header.ConvolutionKernel = case.kernel
    return input_features(header, case.hu, case.geometry.spacing)


def output_features(nodules: pd.DataFrame | None, seconds: float | None) -> dict:
    """What the model said: candidates kept, their best score, their total volume."""
    if nodules is None:
        return {"candidates": None, "top_score": None, "nodule_volume_mm3": None}
    return {
        "candidates": int(len(nodules)),
        "top_score": float(nodules["score"].max()) if len(nodules) else 0.0,
        "nodule_volume_mm3": float(nodules["volume_mm3"].sum()) if len(nodules) else 0.0,
        "inference_seconds": None if seconds is None else round(float(seconds), 3),
    }


def series_record(
    first: pydicom.Dataset, hu, spacing, nodules=None, seconds=None, model_version: str = ""
) -> dict:
    series = str(first.get("SeriesInstanceUID", ""))
    return {
        "series": hashlib.sha256(series.encode()).hexdigest()[:16],  # de-duplication, not identity
        "recorded": round(time.time(), 3),
        "model_version": model_version,
        **input_features(first, hu, spacing),
        **output_features(nodules, seconds),
    }


def append(records_dir: Path, record: dict) -> Path:
    """Add a record to the folder (one file, atomic, never overwritten)."""
    path = Path(records_dir) / f"{time.time_ns():020d}-{os.getpid()}-{record['series']}.json"
    write_json(inside(records_dir, path), record)
    return path


def load_reference(path: Path) -> list[dict]:
    """A reference JSON (stage monitor_reference) as one list: the training series' input
    features and the test split's output features; each feature is compared where it has values."""
    data = json.loads(Path(path).read_text())
    return list(data.get("records", [])) + list(data.get("outputs", []))


def load(folder: Path, newest: int | None = None) -> list[dict]:
    """Records of a folder, oldest first (only the ``newest`` ones are read when given)."""
    files = sorted(Path(folder).glob("*.json"))  # names start with the time in ns
    return [json.loads(p.read_text()) for p in files[-newest if newest else 0 :]]
