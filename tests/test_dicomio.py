"""Series reading that real exports survive: multi-frame files and uneven slice steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from ctpipe import dicomio


def single_frame_series(tmp_path: Path, write_tiny_cohort) -> list[Path]:
    write_tiny_cohort(tmp_path / "single", n=1)
    return sorted((tmp_path / "single").rglob("*.dcm"))


def to_multiframe(files: list[Path], out: Path) -> Path:
    """The same series as one Enhanced-CT-style multi-frame file with per-frame functional groups."""
    slices = [pydicom.dcmread(f) for f in files]
    first = slices[0]
    ds = Dataset()
    ds.file_meta = first.file_meta
    for key in (
        "PatientID",
        "PatientName",
        "StudyInstanceUID",
        "FrameOfReferenceUID",
        "Modality",
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
    ):
        setattr(ds, key, getattr(first, key))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = first.PixelSpacing
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = first.RescaleSlope
    shared.PixelValueTransformationSequence[0].RescaleIntercept = first.RescaleIntercept
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for s in reversed(slices):  # frames stored in reverse: the reader must sort by position
        g = Dataset()
        g.PlanePositionSequence = Sequence([Dataset()])
        g.PlanePositionSequence[0].ImagePositionPatient = s.ImagePositionPatient
        per_frame.append(g)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(s.PixelData for s in reversed(slices))
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_multiframe_reads_like_single_frames(tmp_path, write_tiny_cohort):
    files = single_frame_series(tmp_path, write_tiny_cohort)
    multi = to_multiframe(files, tmp_path / "multi" / "enhanced.dcm")
    manifest = dicomio.scan_folder(tmp_path / "multi")
    assert manifest["status"].tolist() == ["ok"], manifest["reason"].tolist()
    vol_m, geom_m = dicomio.read_series([multi])
    vol_s, geom_s = dicomio.read_series(files)
    assert np.array_equal(vol_m, vol_s)
    np.testing.assert_allclose(geom_m.origin, geom_s.origin)
    np.testing.assert_allclose(geom_m.spacing, geom_s.spacing)


def test_missing_slice_rejected_or_resampled(tmp_path, write_tiny_cohort):
    files = single_frame_series(tmp_path, write_tiny_cohort)
    full, geom = dicomio.read_series(files)
    files[7].unlink()
    root = tmp_path / "single"
    rejected = dicomio.scan_folder(root)
    assert set(rejected["status"]) == {"skipped"}
    assert rejected["reason"].str.contains("missing slice").all()
    accepted = dicomio.scan_folder(root, uneven="resample")
    assert set(accepted["status"]) == {"ok"}
    assert accepted["reason"].str.contains("resampled to even slice steps").all()
    ((uid, paths),) = dicomio.series_files(accepted).items()
    vol, g = dicomio.read_series([root / p for p in paths])
    assert vol.shape == full.shape
    np.testing.assert_allclose(g.spacing, geom.spacing)
    # The missing slice is the mean of its neighbours; every other slice is untouched.
    np.testing.assert_allclose(vol[7], (full[6] + full[8]) / 2, atol=1e-4)
    keep = [k for k in range(len(full)) if k != 7]
    np.testing.assert_array_equal(vol[keep], full[keep])
