"""Scanning a folder of DICOM files: one record per file, series grouped and checked, then read.

Every file found gets a row in the manifest, ``status`` ``ok`` or ``skipped`` with a ``reason`` a
person understands (not DICOM, truncated, wrong modality, duplicate slice, missing slice, ...).
A series is accepted only if its slices, sorted by position along the slice normal (never by file
name or InstanceNumber), step evenly; its volume is then read with the geometry the headers
describe (origin, spacing, direction), in HU (RescaleSlope/Intercept applied).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError
from tqdm import tqdm

from ctpipe.geometry import Geometry

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "status", "reason", "patient_id", "series_uid", "study_uid", "modality",
                    "position_mm", "instance", "sop_uid"]
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def scan_file(path: Path, root: Path) -> dict:
    """Read one file's header and check that it is a complete single-image DICOM slice."""
    rec = {"path": str(path.relative_to(root)), "status": "ok", "reason": ""}
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        return {**rec, "status": "skipped", "reason": "not a DICOM file (no DICM preamble)"}
    except Exception as exc:  # pydicom raises many types on damaged files
        return {**rec, "status": "skipped", "reason": f"unreadable DICOM: {exc}"}
    rec.update(patient_id=str(ds.get("PatientID", "")), series_uid=str(ds.get("SeriesInstanceUID", "")), study_uid=str(ds.get("StudyInstanceUID", "")),
               modality=str(ds.get("Modality", "")), sop_uid=str(ds.get("SOPInstanceUID", "")),
               instance=int(ds.get("InstanceNumber", 0) or 0))
    problem = _header_problem(ds)
    if problem:
        return {**rec, "status": "skipped", "reason": problem}
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    rec["position_mm"] = float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), np.cross(iop[:3], iop[3:])))
    rec["iop"] = tuple(np.round(iop, 4))
    rec["grid"] = (int(ds.Rows), int(ds.Columns), *np.round(np.array(ds.PixelSpacing, dtype=float), 4))
    rec["ipp"] = tuple(float(v) for v in ds.ImagePositionPatient)
    return rec


def _header_problem(ds: pydicom.Dataset) -> str:
    """Why a dataset cannot be a slice of a CT volume, or '' if it can."""
    if not ds.get("SeriesInstanceUID"):
        return "no SeriesInstanceUID"
    if "PixelData" not in ds:
        return "no pixel data (not an image)"
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return "multi-frame image: not supported by this reader yet"
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if key not in ds:
            return f"missing {key}: geometry unknown"
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    if syntax in UNCOMPRESSED:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) < expected:
            return f"truncated pixel data: {len(ds.PixelData)} of {expected} bytes"
    return ""


def scan_folder(root: str | Path, workers: int = 1, **checks) -> pd.DataFrame:
    """Scan every file under ``root`` (recursively) and check each series; one row per file.

    ``checks`` go to :func:`check_series` (modalities, min_slices, spacing_tolerance).
    """
    root = Path(root)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(workers) as pool:
            records = list(tqdm(pool.map(scan_file, paths, [root] * len(paths), chunksize=32),
                                total=len(paths), desc="scan DICOM", unit="file"))
    else:
        records = [scan_file(p, root) for p in tqdm(paths, desc="scan DICOM", unit="file")]
    return check_series(records, **checks)


def check_series(records: list[dict], modalities=("CT",), min_slices: int = 1,
                 spacing_tolerance: float = 0.05) -> pd.DataFrame:
    """Group readable slices by series and reject series that would give a wrong volume."""
    by_series: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        if rec["status"] == "ok":
            by_series[rec["series_uid"]].append(rec)
    for uid, recs in by_series.items():
        reason = _series_problem(recs, modalities, min_slices, spacing_tolerance)
        if reason:
            for rec in recs:
                if rec["status"] == "ok":
                    rec.update(status="skipped", reason=reason)
    frame = pd.DataFrame.from_records(records)
    for col in MANIFEST_COLUMNS:
        if col not in frame:
            frame[col] = None
    return frame[MANIFEST_COLUMNS].sort_values("path", ignore_index=True)


def _series_problem(recs, modalities, min_slices, tolerance) -> str:
    """Mark duplicates in ``recs`` in place; return why the whole series is rejected, or ''."""
    modality = recs[0]["modality"]
    if modality not in modalities:
        return f"modality {modality or 'missing'} is not one of {list(modalities)}"
    if len({r["iop"] for r in recs}) > 1:
        return "slices have different ImageOrientationPatient"
    if len({r["grid"] for r in recs}) > 1:
        return "slices have different Rows/Columns/PixelSpacing"
    recs.sort(key=lambda r: (r["position_mm"], r["path"]))
    kept = [recs[0]]
    for rec in recs[1:]:
        prev = kept[-1]
        if abs(rec["position_mm"] - prev["position_mm"]) < 1e-3:
            same = "same SOPInstanceUID" if rec["sop_uid"] == prev["sop_uid"] else "another SOPInstanceUID"
            rec.update(status="skipped",
                       reason=f"duplicate slice: same position as {prev['path']} ({same})")
        else:
            kept.append(rec)
    if len(kept) < min_slices:
        return f"only {len(kept)} slices (min_slices is {min_slices})"
    pos = np.array([r["position_mm"] for r in kept])
    steps = np.diff(pos)
    step = float(np.median(steps))
    bad = np.nonzero(np.abs(steps - step) > tolerance * step)[0]
    if len(bad):
        b = int(bad[0])
        ratio = steps[b] / step
        what = (f"missing slice(s): gap of {steps[b]:.2f} mm" if ratio > 1.5
                else f"non-uniform slice spacing: step of {steps[b]:.2f} mm")
        return f"{what} after position {pos[b]:.2f} mm where the series steps {step:.2f} mm"
    # Gantry tilt: slice origins must advance along the slice normal, not obliquely to it.
    iop = np.array(kept[0]["iop"])
    normal = np.cross(iop[:3], iop[3:])
    travel = np.array(kept[-1]["ipp"]) - np.array(kept[0]["ipp"])
    tilt = np.degrees(np.arccos(np.clip(abs(travel @ normal) / np.linalg.norm(travel), -1, 1)))
    if tilt > 0.5:
        return f"gantry tilt of {tilt:.1f} degrees: slices are sheared, resample before use"
    return ""


def series_files(manifest: pd.DataFrame) -> dict[str, list[str]]:
    """Accepted series -> their file paths, sorted along the slice normal."""
    ok = manifest[manifest["status"] == "ok"].sort_values(["series_uid", "position_mm"])
    return {uid: list(group["path"]) for uid, group in ok.groupby("series_uid", sort=True)}


def read_series(paths: list[Path]) -> tuple[np.ndarray, Geometry]:
    """Read sorted slices into an HU volume ``[k, j, i]`` (float32) and its geometry."""
    slices = [pydicom.dcmread(p) for p in paths]
    first = slices[0]
    iop = np.array(first.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    ipps = np.array([s.ImagePositionPatient for s in slices], dtype=float)
    step = float(np.median(np.diff(ipps @ normal))) if len(slices) > 1 else float(first.get("SliceThickness", 1))
    dy, dx = (float(v) for v in first.PixelSpacing)
    geom = Geometry(ipps[0], (dx, dy, step), np.column_stack([row_dir, col_dir, normal]))
    volume = np.empty((len(slices), int(first.Rows), int(first.Columns)), dtype=np.float32)
    for k, s in enumerate(slices):
        slope, intercept = float(s.get("RescaleSlope", 1)), float(s.get("RescaleIntercept", 0))
        volume[k] = s.pixel_array.astype(np.float32) * slope + intercept
    return volume, geom
