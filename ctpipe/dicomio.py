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

from ctpipe.geometry import Geometry
from ctpipe.listing import display_path, list_files, strerror
from ctpipe.progress import progress
from ctpipe.safepath import uid_reason

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path",
    "status",
    "reason",
    "patient_id",
    "series_uid",
    "study_uid",
    "modality",
    "position_mm",
    "instance",
    "sop_uid",
]
# Record fields holding a UID, and the attribute each comes from.
UID_FIELDS = {
    "study_uid": "StudyInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "sop_uid": "SOPInstanceUID",
}
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


# Header values that, when unreadable, make a file useless: read through one guard each.
BAD_VALUE = (AttributeError, KeyError, IndexError, TypeError, ValueError, OverflowError)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "")
    except BAD_VALUE:
        return ""


def _number(ds: pydicom.Dataset, keyword: str, default: int = 0) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except BAD_VALUE:
        return default


def scan_file(path: Path, root: Path) -> dict:
    """Read one file's header and check that it is a complete single-image DICOM slice.

    Never raises for a bad file: every problem becomes the ``reason`` of a ``skipped`` record.
    """
    rec = {"path": display_path(path, root), "status": "ok", "reason": ""}
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        return {**rec, "status": "skipped", "reason": "not a DICOM file (no DICM preamble)"}
    except OSError as exc:  # permission denied, or the file vanished since it was listed
        return {**rec, "status": "skipped", "reason": f"cannot be read: {strerror(exc)}"}
    except Exception as exc:  # pydicom raises many types on damaged files
        return {**rec, "status": "skipped", "reason": f"unreadable DICOM: {exc}"}
    rec.update(
        patient_id=_text(ds, "PatientID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        frame_uid=_text(ds, "FrameOfReferenceUID"),
        modality=_text(ds, "Modality"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        instance=_number(ds, "InstanceNumber"),
    )
    try:
        problem = _header_problem(ds)
        if problem:
            return {**rec, "status": "skipped", "reason": problem}
        frames = frame_geometry(ds)
        problem = _geometry_problem(frames)
        grid = (int(ds.Rows), int(ds.Columns), *np.round(frames[0]["spacing"], 4))
    except BAD_VALUE as exc:
        return {**rec, "status": "skipped", "reason": f"bad header value: {exc}"}
    if problem:
        return {**rec, "status": "skipped", "reason": problem}
    iop = np.array(frames[0]["iop"])
    normal = np.cross(iop[:3], iop[3:])
    rec["frames"] = [(float(np.dot(f["ipp"], normal)), f["ipp"]) for f in frames]
    rec["position_mm"] = rec["frames"][0][0]
    rec["iop"] = tuple(np.round(iop, 4))
    rec["grid"] = grid
    return rec


def _geometry_problem(frames: list[dict]) -> str:
    """Why the frames' geometry cannot place voxels in the world, or ''."""
    if len({(f["iop"], f["spacing"]) for f in frames}) > 1:
        return "frames of one file differ in orientation or spacing"
    spacing, iop = np.asarray(frames[0]["spacing"]), np.asarray(frames[0]["iop"])
    if spacing.shape != (2,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        return f"PixelSpacing {spacing.tolist()} is not two positive numbers"
    if any(len(f["ipp"]) != 3 or not np.all(np.isfinite(f["ipp"])) for f in frames):
        return "ImagePositionPatient is not three finite numbers"
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
        return "ImageOrientationPatient is not six finite numbers"
    row, col = iop[:3], iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3:
        return "ImageOrientationPatient rows and columns are not unit vectors"
    if abs(float(row @ col)) > 1e-3:
        return "ImageOrientationPatient rows and columns are not perpendicular"
    return ""


def frame_geometry(ds: pydicom.Dataset) -> list[dict]:
    """Position, orientation, spacing and rescale of every frame (single- or multi-frame file)."""

    def rescale(groups) -> tuple[float, float]:
        for g in groups:
            if g is not None and "PixelValueTransformationSequence" in g:
                t = g.PixelValueTransformationSequence[0]
                return float(t.RescaleSlope), float(t.RescaleIntercept)
        return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)

    if "PerFrameFunctionalGroupsSequence" not in ds:  # classic single-frame image
        return [
            {
                "ipp": tuple(float(v) for v in ds.ImagePositionPatient),
                "iop": tuple(round(float(v), 6) for v in ds.ImageOrientationPatient),
                "spacing": tuple(float(v) for v in ds.PixelSpacing),
                "rescale": rescale([]),
            }
        ]
    shared = (
        ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    )

    def find(group, seq: str):
        for g in (group, shared):
            if g is not None and seq in g:
                return g[seq].value[0]
        raise KeyError(f"{seq} in neither per-frame nor shared functional groups")

    return [
        {
            "ipp": tuple(float(v) for v in find(g, "PlanePositionSequence").ImagePositionPatient),
            "iop": tuple(
                round(float(v), 6)
                for v in find(g, "PlaneOrientationSequence").ImageOrientationPatient
            ),
            "spacing": tuple(float(v) for v in find(g, "PixelMeasuresSequence").PixelSpacing),
            "rescale": rescale([g, shared]),
        }
        for g in ds.PerFrameFunctionalGroupsSequence
    ]


def _header_problem(ds: pydicom.Dataset) -> str:
    """Why a dataset cannot be a slice of a CT volume, or '' if it can."""
    if not ds.get("SeriesInstanceUID"):
        return "no SeriesInstanceUID"
    if "PixelData" not in ds:
        return "no pixel data (not an image)"
    if "LOCALIZER" in _text(ds, "ImageType").upper():
        return "localizer (scout) image: not a slice of a volume"
    for key in ("Rows", "Columns", "BitsAllocated"):
        if key not in ds:
            return f"missing {key}"
    if int(ds.Rows) <= 0 or int(ds.Columns) <= 0:
        return f"Rows x Columns {ds.Rows} x {ds.Columns}: no pixels"
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        return f"SamplesPerPixel {samples}: not a greyscale image"
    bits, stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated) or 0)
    if bits not in (8, 16, 32) or not 0 < stored <= bits:
        return f"BitsAllocated {bits} / BitsStored {stored}: not a valid pixel format"
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    if syntax in UNCOMPRESSED:
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1))
            * int(ds.get("NumberOfFrames", 1) or 1)
            * int(ds.BitsAllocated)
            // 8
        )
        if len(ds.PixelData) < expected:
            return f"truncated pixel data: {len(ds.PixelData)} of {expected} bytes"
        if len(ds.PixelData) > expected + expected % 2:  # one pad byte to even length at most
            return (
                f"pixel data of {len(ds.PixelData)} bytes, but Rows x Columns x frames x "
                f"BitsAllocated need {expected}: header and data disagree"
            )
    else:  # compressed: only decoding tells whether it is complete and whether a decoder is installed
        try:
            _ = ds.pixel_array  # decodes: raises when truncated or no decoder is installed
        except Exception as exc:
            return f"compressed pixel data ({syntax}) cannot be decoded: {exc}"
    return ""


def scan_folder(root: str | Path, workers: int = 1, **checks) -> pd.DataFrame:
    """Scan every file under ``root`` (recursively) and check each series; one row per file.

    ``checks`` go to :func:`check_series` (modalities, min_slices, spacing_tolerance, uneven,
    uids).
    """
    root = Path(root)
    paths, unscannable = list_files(root)
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(workers) as pool:
            records = list(
                progress(
                    pool.map(scan_file, paths, [root] * len(paths), chunksize=32),
                    total=len(paths),
                    desc="scan DICOM",
                    unit="file",
                )
            )
    else:
        records = [scan_file(p, root) for p in progress(paths, desc="scan DICOM", unit="file")]
    return check_series(records + unscannable, **checks)


def check_series(
    records: list[dict],
    modalities=("CT",),
    min_slices: int = 1,
    spacing_tolerance: float = 0.05,
    uneven: str = "reject",
    uids: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Group readable files by series and reject series that would give a wrong volume.

    Args:
        modalities: accepted modalities (None accepts any).
        uneven: what to do with slices that do not step evenly (a missing slice, non-uniform
            spacing): ``reject`` the series, or ``resample`` it onto even steps (noted in reason).
        uids: record fields (keys of :data:`UID_FIELDS`) that must be DICOM UIDs (PS3.5 9.1):
            a file where one is not is skipped with the reason before its series is checked.
    """
    by_series: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        bad = [key for key in uids if rec["status"] == "ok" and uid_reason(rec.get(key))]
        if bad:
            rec.update(status="skipped", reason=f"{UID_FIELDS[bad[0]]}: {uid_reason(rec[bad[0]])}")
        if rec["status"] == "ok":
            by_series[rec["series_uid"]].append(rec)
    for recs in by_series.values():
        reason = _series_problem(recs, modalities, min_slices, spacing_tolerance)
        if reason.startswith("uneven: ") and uneven == "resample":
            note = f"accepted, resampled to even slice steps: {reason[8:]}"
            for rec in recs:
                if rec["status"] == "ok":
                    rec["reason"] = note
        elif reason:
            for rec in recs:
                if rec["status"] == "ok":
                    rec.update(status="skipped", reason=reason.removeprefix("uneven: "))
    frame = pd.DataFrame.from_records(records)
    for col in MANIFEST_COLUMNS:
        if col not in frame:
            frame[col] = None
    return frame[MANIFEST_COLUMNS].sort_values("path", ignore_index=True)


def _series_problem(recs, modalities, min_slices, tolerance) -> str:
    """Mark duplicate files in ``recs`` in place; return why the series is rejected, or ''.

    A reason starting with ``uneven: `` concerns slice steps only (the ``uneven`` option applies).
    """
    acquisitions = {(r.get("frame_uid", ""), r["patient_id"]) for r in recs}
    if len(acquisitions) > 1:
        return (
            f"SeriesInstanceUID shared by {len(acquisitions)} acquisitions (another "
            "FrameOfReferenceUID or PatientID): not one volume"
        )
    if len({r["modality"] for r in recs}) > 1:
        return f"slices of several modalities {sorted({r['modality'] for r in recs})}"
    modality = recs[0]["modality"]
    if modalities is not None and modality not in modalities:
        return f"modality {modality or 'missing'} is not one of {list(modalities)}"
    if len({r["iop"] for r in recs}) > 1:
        return "slices have different ImageOrientationPatient"
    if len({r["grid"] for r in recs}) > 1:
        return "slices have different Rows/Columns/PixelSpacing"
    recs.sort(key=lambda r: (r["position_mm"], r["path"]))
    seen: dict[float, dict] = {}
    for rec in recs:
        for pos, _ in rec["frames"]:
            prev = next((seen[p] for p in seen if abs(p - pos) < 1e-3), None)
            if prev is None:
                continue
            if prev is rec or len(rec["frames"]) > 1:
                return f"two frames at position {pos:.2f} mm in {rec['path']}"
            same = "same" if rec["sop_uid"] == prev["sop_uid"] else "another"
            rec.update(
                status="skipped",
                reason=f"duplicate slice: same position as {prev['path']} ({same} SOPInstanceUID)",
            )
            break
        if rec["status"] == "ok":
            seen.update({pos: rec for pos, _ in rec["frames"]})
    frames = sorted((pos, ipp) for r in recs if r["status"] == "ok" for pos, ipp in r["frames"])
    if len(frames) < min_slices:
        return f"only {len(frames)} slices (min_slices is {min_slices})"
    if len(frames) < 2:
        return ""
    pos = np.array([p for p, _ in frames])
    steps = np.diff(pos)
    step = float(np.median(steps))
    bad = np.nonzero(np.abs(steps - step) > tolerance * step)[0]
    # Gantry tilt: slice origins must advance along the slice normal, not obliquely to it.
    iop = np.array(recs[0]["iop"])
    normal = np.cross(iop[:3], iop[3:])
    travel = np.array(frames[-1][1]) - np.array(frames[0][1])
    tilt = np.degrees(np.arccos(np.clip(abs(travel @ normal) / np.linalg.norm(travel), -1, 1)))
    if tilt > 0.5:
        return f"gantry tilt of {tilt:.1f} degrees: slices are sheared, resample before use"
    if len(bad):
        b = int(bad[0])
        what = (
            f"missing slice(s): gap of {steps[b]:.2f} mm"
            if steps[b] / step > 1.5
            else f"non-uniform slice spacing: step of {steps[b]:.2f} mm"
        )
        return f"uneven: {what} after position {pos[b]:.2f} mm where the series steps {step:.2f} mm"
    return ""


AGE_UNITS_PER_YEAR = {"Y": 1.0, "M": 12.0, "W": 52.0, "D": 365.0}  # PatientAge: nnnY/M/W/D


def header_attributes(path: Path) -> dict:
    """Sex, age (years), scanner and slice thickness (mm) from one file's header; None where a
    value is absent or unreadable (de-identification without option 113108 removes sex and age).

    ``scanner`` is Manufacturer and ManufacturerModelName joined; the slice thickness comes from
    SliceThickness, or for an enhanced multi-frame file from its shared Pixel Measures.
    """
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sex = _text(ds, "PatientSex").strip().upper()
    age = _text(ds, "PatientAge").strip().upper()
    try:
        years = int(age[:-1]) / AGE_UNITS_PER_YEAR[age[-1]] if age else None
    except (KeyError, ValueError):
        years = None
    scanner = " ".join(
        part for part in (_text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName")) if part
    )
    return {
        "sex": sex if sex in ("F", "M", "O") else None,
        "age_years": years,
        "scanner": scanner.strip()[:64] or None,
        "slice_thickness_mm": _thickness(ds),
    }


def _thickness(ds: pydicom.Dataset) -> float | None:
    try:
        value = ds.get("SliceThickness")
        if value is None:
            shared = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            value = shared.get("SliceThickness")
        value = float(value)
    except BAD_VALUE:
        return None
    return value if value > 0 else None


def series_files(manifest: pd.DataFrame) -> dict[str, list[str]]:
    """Accepted series -> their file paths, sorted along the slice normal."""
    ok = manifest[manifest["status"] == "ok"].sort_values(["series_uid", "position_mm", "path"])
    return {uid: list(group["path"]) for uid, group in ok.groupby("series_uid", sort=True)}


def read_series(
    paths: list[Path], uneven: str = "resample", tolerance: float = 0.05
) -> tuple[np.ndarray, Geometry]:
    """Read a series (single- or multi-frame files) into an HU volume ``[k, j, i]`` and its geometry.

    Frames are sorted by position along the slice normal. Uneven steps are resampled onto the
    median step by linear interpolation along the normal (``uneven="resample"``) or refused.
    """
    slices = []  # (position along normal, ipp, hu frame)
    first_geom = None
    for path in paths:
        ds = pydicom.dcmread(path)
        frames = frame_geometry(ds)
        first_geom = first_geom or frames[0]
        pixels = ds.pixel_array.reshape(len(frames), int(ds.Rows), int(ds.Columns))
        iop = np.array(frames[0]["iop"])
        normal = np.cross(iop[:3], iop[3:])
        for f, px in zip(frames, pixels):
            hu = px.astype(np.float32) * f["rescale"][0] + f["rescale"][1]
            slices.append((float(np.dot(f["ipp"], normal)), np.array(f["ipp"]), hu))
    slices.sort(key=lambda t: t[0])
    iop = np.array(first_geom["iop"])
    row_dir, col_dir = iop[:3], iop[3:]
    pos = np.array([t[0] for t in slices])
    volume = np.stack([t[2] for t in slices])
    step = float(np.median(np.diff(pos))) if len(pos) > 1 else 1.0
    if len(pos) > 1 and np.any(np.abs(np.diff(pos) - step) > tolerance * step):
        if uneven != "resample":
            raise ValueError(f"{paths[0]}: uneven slice steps {np.round(np.diff(pos), 2).tolist()}")
        volume, pos = _even_steps(volume, pos, step)
    dy, dx = first_geom["spacing"]
    geom = Geometry(
        slices[0][1],
        (dx, dy, step),
        np.column_stack([row_dir, col_dir, np.cross(row_dir, col_dir)]),
    )
    return volume, geom


def _even_steps(volume: np.ndarray, pos: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation along the slice axis onto positions ``pos[0] + step * n``."""
    target = pos[0] + step * np.arange(int(np.floor((pos[-1] - pos[0]) / step + 1e-6)) + 1)
    idx = np.clip(np.searchsorted(pos, target, side="right") - 1, 0, len(pos) - 2)
    w = (target - pos[idx]) / (pos[idx + 1] - pos[idx])
    w = np.where(w < 1e-4, 0.0, np.where(w > 1 - 1e-4, 1.0, w)).astype(np.float32)[:, None, None]
    # Targets on an existing slice (w snapped to 0 or 1) copy it exactly.
    return (1 - w) * volume[idx] + w * volume[idx + 1], target
