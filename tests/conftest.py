"""Shared fixtures: a tiny synthetic cohort written as DICOM, and tiny params for every stage."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ctpipe import synth

ROOT = Path(__file__).resolve().parents[1]

TINY_SYNTH = {
    "n_patients": 4, "matrix": 48, "pixel_spacing_mm": [5.0, 6.0], "slice_spacing_mm": [5.0],
    "z_extent_mm": 200, "oblique_degrees": 0, "vessels_per_lung": 2, "fraction_without_nodules": 0.0,
    "max_nodules": 2, "diameter_mm": [12, 30], "part_solid_fraction": 0.25, "blur_voxels": 0.6,
    "noise_hu": 20,
}


def tiny_params() -> dict:
    """params.yaml with every section shrunk so that the whole pipeline runs in about a minute."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"].update(workers=1, min_slices=8, synthetic=copy.deepcopy(TINY_SYNTH))
    params["preprocess"].update(workers=1, split={"val_fraction": 0.25, "test_fraction": 0.25, "folds": 0})
    params["train"].update(features=[4, 4, 8, 8, 16, 4], patch_size=32, batch_size=4, epochs=2,
                           samples_per_epoch=8, val_roi_size=64)
    params["inference"].update(roi_size=64)
    params["evaluate"].update(bootstrap=20)
    # An untrained tiny model: the INT8 gate is opened, the sweep and timings shrunk.
    params["quantize"].update(max_dice_drop=1.0, calibration_slabs=8, sweep_slabs=16,
                              latency_runs=3, latency_rounds=1, sweep_latency_runs=2, entropy_bins=256)
    params["export"].update(parity_shapes=[[1, 32, 48], [2, 48, 32]])
    return params


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params()))
    return path


def write_tiny_cohort(out: Path, n: int = 3, seed: int = 7, **overrides) -> list[dict]:
    """Write ``n`` tiny synthetic studies under ``out``; return their annotation rows."""
    cfg = {**TINY_SYNTH, **overrides}
    rows = []
    for i in range(n):
        rows += synth.write_case(out, seed, i, cfg, oblique=float(cfg["oblique_degrees"]) > 0)
    return rows
