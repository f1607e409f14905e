"""Hostile input to the DICOM scan that ingest and predict share: every file in the manifest with a
reason, no traceback, and the valid series still accepted (issue 15's mutation families that reach
``ctpipe.dicomio``)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config
from pydicom.dataelem import DataElement

from ctpipe import dicomio
from ctpipe.geometry import Geometry

# (name, keyword, VR, value, reason the file gets); None: the file stays usable
HEADER_MUTATIONS = [
    ("instance_abc", "InstanceNumber", "IS", "abc", None),
    ("frames_abc", "NumberOfFrames", "IS", "abc", "bad header value"),
    ("rgb", "SamplesPerPixel", "US", 3, "SamplesPerPixel 3"),
    ("bits_stored", "BitsStored", "US", 20, "not a valid pixel format"),
    ("spacing_zero", "PixelSpacing", "DS", ["0", "0.7"], "PixelSpacing"),
    ("spacing_negative", "PixelSpacing", "DS", ["-0.7", "0.7"], "PixelSpacing"),
    ("spacing_nan", "PixelSpacing", "DS", ["nan", "0.7"], "PixelSpacing"),
    ("position_inf", "ImagePositionPatient", "DS", ["0", "inf", "0"], "ImagePositionPatient"),
    ("orientation_scaled", "ImageOrientationPatient", "DS", ["2", "0", "0", "0", "1", "0"], "unit"),
    (
        "orientation_parallel",
        "ImageOrientationPatient",
        "DS",
        ["1", "0", "0", "1", "0", "0"],
        "perpendicular",
    ),
    ("orientation_short", "ImageOrientationPatient", "DS", ["1", "0", "0"], "six finite"),
]


def write_raw(ds: pydicom.Dataset, path: Path, keyword: str, vr: str, value) -> None:
    """Save ``ds`` with ``keyword`` set to a value pydicom would refuse to write if it validated."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.settings.writing_validation_mode = config.IGNORE
        try:
            text = value if isinstance(value, list) or vr not in ("IS", "DS") else [value]
            elem = DataElement(
                tag, "LO" if vr in ("IS", "DS") else vr, text if vr in ("IS", "DS") else value
            )
            elem.VR = vr  # the bytes as a broken export writes them, not as pydicom would convert
            ds[tag] = elem
            ds.save_as(path)
        finally:
            config.settings.writing_validation_mode = config.WARN


@pytest.fixture
def hostile(tmp_path, write_tiny_cohort) -> tuple[Path, dict]:
    """A valid tiny series plus one file per mutation, each in a series of its own."""
    write_tiny_cohort(tmp_path / "gen", n=1, seed=5)
    root = tmp_path / "study"
    (gen,) = list((tmp_path / "gen").iterdir())
    files = sorted(gen.glob("*.dcm"))
    (root / "valid").mkdir(parents=True)
    for f in files:
        (root / "valid" / f.name).write_bytes(f.read_bytes())
    expected = {}
    for name, keyword, vr, value, reason in HEADER_MUTATIONS:
        ds = pydicom.dcmread(files[0])
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        write_raw(ds, root / f"{name}.dcm", keyword, vr, value)
        expected[f"{name}.dcm"] = reason
    # another acquisition under the valid series' UID: another frame of reference
    ds = pydicom.dcmread(files[0])
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.ImagePositionPatient = [0, 0, -999]
    ds.save_as(root / "shared_uid.dcm")
    # links, special files, names
    (root / "loop").symlink_to(root)
    (root / "dangling.dcm").symlink_to(root / "missing.dcm")
    (root / "linked.dcm").symlink_to(root / "valid" / files[1].name)
    os.mkfifo(root / "fifo.dcm")
    (root / os.fsdecode(b"caf\xe9.dcm")).write_bytes(files[2].read_bytes())
    return root, expected


def test_every_file_is_in_the_manifest_with_a_reason(hostile):
    root, expected = hostile
    manifest = dicomio.scan_folder(root)  # must not raise
    by_path = dict(zip(manifest["path"], zip(manifest["status"], manifest["reason"])))
    for name, reason in expected.items():
        status, why = by_path[name]
        if reason is None:
            assert status == "ok", (name, why)
        else:
            assert status == "skipped" and reason in why, (name, status, why)
    assert by_path["loop"] == ("skipped", "symbolic link to a folder: not followed")
    assert by_path["dangling.dcm"] == ("skipped", "dangling symbolic link")
    assert by_path["fifo.dcm"][1].startswith("not a regular file")
    assert by_path["caf\\xe9.dcm"] == ("skipped", "file name is not valid UTF-8")
    assert all(
        isinstance(r, str) and r
        for s, r in zip(manifest["status"], manifest["reason"])
        if s != "ok"
    )


def test_a_series_uid_shared_by_two_acquisitions_is_not_one_volume(hostile):
    root, _ = hostile
    manifest = dicomio.scan_folder(root)
    valid = manifest[
        manifest["path"].str.startswith("valid/") | (manifest["path"] == "shared_uid.dcm")
    ]
    assert set(valid["status"]) == {"skipped"}
    assert valid["reason"].str.contains("SeriesInstanceUID shared by 2 acquisitions").all()


def test_the_valid_series_still_goes_through(hostile):
    root, _ = hostile
    (root / "shared_uid.dcm").unlink()
    manifest = dicomio.scan_folder(root)
    valid = [p for p in manifest["path"] if p.startswith("valid/")]
    uid = pydicom.dcmread(root / valid[0]).SeriesInstanceUID
    accepted = dicomio.series_files(manifest)[uid]
    # linked.dcm is the same slice as one valid file (followed once): one of the two is used
    assert len(accepted) == len(valid) and set(accepted) <= {*valid, "linked.dcm"}
    volume, geom = dicomio.read_series([root / p for p in accepted])
    assert volume.shape[0] == len(valid) and np.all(np.isfinite(volume))
    assert not math.isnan(float(geom.spacing[0]))


def test_geometry_refuses_a_shear_with_unit_determinant():
    shear = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # det 1, not orthonormal
    assert abs(np.linalg.det(shear)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="orthonormal"):
        Geometry((0, 0, 0), (1, 1, 1), shear)
    Geometry((0, 0, 0), (1, 1, 1), np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]]))  # a rotation
