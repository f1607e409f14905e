"""Preprocessing as nnU-Net does it: a dataset fingerprint, a plan derived from it, then per case
resample -> crop to the body -> normalise -> nodule mask.

The fingerprint records every case's spacing and shape and samples of its intensities (body
voxels, and nodule voxels, nnU-Net's "foreground"). The plan takes from it the target spacing
(median; the 10th percentile on an axis whose spacing is over 3x the others) and the intensity
normalisation. Images are resampled with linear or B-spline interpolation; nodule masks are drawn
from the world-coordinate annotations directly on the target grid (sharper than drawing on the
native grid and resampling with nearest neighbour, which is what one does with an input mask).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ctpipe import dicomio
from ctpipe.geometry import Geometry, index_to_world
from ctpipe.intensity import normalise
from ctpipe.labels import nodule_mask

if TYPE_CHECKING:
    from ctpipe import config

INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
FINGERPRINT_VOXELS = 10_000  # intensity samples per case and region, seeded
CROP_MARGIN_MM = 5.0  # kept around the body's bounding box
AGE_BAND_YEARS = 10  # index.json keeps the age band, not the age: decades ...
AGE_TOP_BAND = 90  # ... and 90 and over as one (HIPAA Safe Harbor aggregates ages over 89)


def load_volume(source: dict[str, Any]) -> tuple[np.ndarray, Geometry]:
    """HU volume ``[k, j, i]`` and geometry of a DICOM series or a MetaImage."""
    if source["kind"] == "dicom":
        return dicomio.read_series([Path(p) for p in source["paths"]])
    image = sitk.ReadImage(source["path"], sitk.sitkFloat32)
    return sitk.GetArrayFromImage(image), Geometry.from_sitk(image)


def fingerprint_case(
    source: dict, nodules: pd.DataFrame, cfg: config.Preprocess, seed: int
) -> dict[str, Any]:
    """Spacing, shape and intensity samples (body and nodule voxels) of one case."""
    hu, geom = load_volume(source)
    rng = np.random.default_rng([seed, source["index"]])
    n = FINGERPRINT_VOXELS
    body = hu[hu > cfg.body_threshold_hu]
    mask, _ = nodule_mask(hu.shape, geom, nodules)
    fg = hu[mask > 0]
    return {
        "spacing": geom.spacing.tolist(),
        "shape": list(hu.shape[::-1]),
        "body_sample": rng.choice(body, min(n, body.size), replace=False).tolist()
        if body.size
        else [],
        "nodule_sample": rng.choice(fg, min(n, fg.size), replace=False).tolist() if fg.size else [],
    }


def make_plan(fingerprints: list[dict], cfg: config.Preprocess) -> dict[str, Any]:
    """Derive target spacing and intensity normalisation from the fingerprints."""
    spacings = np.array([f["spacing"] for f in fingerprints])
    if cfg.target_spacing_mm == "auto":
        target = np.median(spacings, axis=0)
        worst = int(np.argmax(target))
        if target[worst] > 3 * np.min(np.delete(target, worst)):
            target[worst] = np.percentile(spacings[:, worst], 10)
    else:
        target = np.asarray(cfg.target_spacing_mm, dtype=float)
    body = np.concatenate([f["body_sample"] for f in fingerprints] or [[0.0]])
    fg = np.concatenate([f["nodule_sample"] for f in fingerprints] or [[]])
    if cfg.normalization == "window":
        lo, hi = cfg.hu_window
        stats = np.clip(body, lo, hi)
    else:  # percentile (config.Preprocess admits no other)
        if fg.size == 0:
            raise ValueError("normalization 'percentile' needs nodule voxels; the cohort has none")
        lo, hi = (float(v) for v in np.percentile(fg, [0.5, 99.5]))
        stats = np.clip(fg, lo, hi)
    return {
        "target_spacing_mm": [round(float(v), 4) for v in target],
        "normalization": {
            "kind": cfg.normalization,
            "clip": [round(lo, 2), round(hi, 2)],
            "mean": round(float(stats.mean()), 4),
            "std": round(float(stats.std()), 4),
        },
        "interpolation": cfg.interpolation,
        "body_threshold_hu": cfg.body_threshold_hu,
        "crop_margin_mm": CROP_MARGIN_MM,
        "fingerprint": {
            "cases": len(fingerprints),
            "spacing_median": np.median(spacings, axis=0).round(4).tolist(),
            "spacing_min": spacings.min(axis=0).round(4).tolist(),
            "spacing_max": spacings.max(axis=0).round(4).tolist(),
            "shape_median": np.median([f["shape"] for f in fingerprints], axis=0).tolist(),
            "body_hu": _stats(body),
            "nodule_hu": _stats(fg),
        },
    }


def _stats(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {}
    p = np.percentile(x, [0.5, 50, 99.5])
    return {
        "mean": round(float(x.mean()), 2),
        "std": round(float(x.std()), 2),
        "p00_5": round(float(p[0]), 2),
        "p50": round(float(p[1]), 2),
        "p99_5": round(float(p[2]), 2),
    }


def resample(
    hu: np.ndarray, geom: Geometry, spacing: np.ndarray, interpolation: str
) -> tuple[np.ndarray, Geometry]:
    """Resample to ``spacing`` on the same origin and direction (the physical extent is kept)."""
    image = geom.apply_to(sitk.GetImageFromArray(hu))
    size = np.maximum(np.round(np.array(image.GetSize()) * geom.spacing / spacing), 1).astype(int)
    out = sitk.Resample(
        image,
        [int(s) for s in size],
        sitk.Transform(),
        INTERPOLATORS[interpolation],
        tuple(geom.origin),
        tuple(float(s) for s in spacing),
        tuple(geom.direction.ravel()),
        -1024.0,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out), Geometry(geom.origin, spacing, geom.direction)


def crop_to_body(
    hu: np.ndarray, geom: Geometry, threshold: float, margin_mm: float
) -> tuple[np.ndarray, Geometry, tuple]:
    """Crop to the bounding box of voxels above ``threshold`` plus a margin; shift the origin."""
    body = np.argwhere(hu > threshold)
    if body.size == 0:
        return hu, geom, tuple(slice(0, s) for s in hu.shape)
    margin = np.ceil(margin_mm / geom.spacing[::-1]).astype(int)
    lo = np.maximum(body.min(axis=0) - margin, 0)
    hi = np.minimum(body.max(axis=0) + margin + 1, hu.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    origin = index_to_world(lo[::-1].astype(float), geom)
    return hu[box], Geometry(origin, geom.spacing, geom.direction), box


def age_band(years: float | None) -> str | None:
    """``"60-69"`` for 65 years, ``"90+"`` from 90 on; None for an unknown age."""
    if years is None or years < 0:
        return None
    low = int(years // AGE_BAND_YEARS * AGE_BAND_YEARS)
    return f"{AGE_TOP_BAND}+" if low >= AGE_TOP_BAND else f"{low}-{low + AGE_BAND_YEARS - 1}"


def case_attributes(source: dict[str, Any], native: Geometry) -> dict[str, Any]:
    """What evaluate's subgroup report groups cases by, and no identity: sex, age band, scanner
    (manufacturer and model), slice thickness (mm; the native slice spacing where the header has
    none, as for a MetaImage). None where unknown."""
    found = dicomio.header_attributes(Path(source["paths"][0])) if source["kind"] == "dicom" else {}
    thickness = found.get("slice_thickness_mm") or float(native.spacing[2])
    return {
        "sex": found.get("sex"),
        "age_band": age_band(found.get("age_years")),
        "scanner": found.get("scanner"),
        "slice_thickness_mm": round(thickness, 3),
    }


def process_case(source: dict, nodules: pd.DataFrame, plan: dict) -> dict[str, Any]:
    """Resample, crop, normalise and draw the mask of one case; return arrays and metadata."""
    hu, geom = load_volume(source)
    attributes = case_attributes(source, geom)
    hu, geom = resample(hu, geom, np.asarray(plan["target_spacing_mm"]), plan["interpolation"])
    hu, geom, _ = crop_to_body(hu, geom, plan["body_threshold_hu"], plan["crop_margin_mm"])
    mask, report = nodule_mask(hu.shape, geom, nodules)
    return {
        "image": normalise(hu, plan["normalization"]).astype(np.float16),
        "label": mask.astype(np.uint8),
        "geometry": geom,
        "nodules": report,
        "attributes": attributes,
    }


def split_patients(patients: pd.DataFrame, cfg: config.Split, seed: int) -> dict[str, list]:
    """Train/val/test by patient, stratified by whether the patient has nodules.

    ``patients`` has one row per patient: ``patient_id``, ``has_nodules``.
    """
    # Imported here: predict imports this module for resampling and needs no scikit-learn (1-2 s).
    from sklearn.model_selection import train_test_split

    ids, strata = patients["patient_id"].to_numpy(), patients["has_nodules"].to_numpy()

    def split(x, y, fraction, salt):
        if len(x) < 2 or round(fraction * len(x)) < 1:  # too few patients to hold any out
            return x, x[:0], y, y[:0]
        try:
            return train_test_split(x, y, test_size=fraction, random_state=seed + salt, stratify=y)
        except ValueError:  # too few patients of one kind to stratify (tiny cohorts)
            return train_test_split(x, y, test_size=fraction, random_state=seed + salt)

    rest, test, rest_y, _ = split(ids, strata, cfg.test_fraction, 0)
    val_share = cfg.val_fraction / (1 - cfg.test_fraction)
    train, val, _, _ = split(rest, rest_y, val_share, 1)
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
