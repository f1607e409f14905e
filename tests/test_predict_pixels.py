"""predict reads the pixel encodings real exports use: unsigned pixels with an intercept, a rescale
slope other than 1, RLE Lossless compression. The same HU give the same mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import RLELossless

from ctpipe.deploy import predict
from ctpipe.fileio import read_json


def _recode(src: Path, dst: Path, how: str) -> None:
    """Copy every slice of ``src`` into ``dst`` with the same HU stored another way."""
    for path in sorted(src.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        if how == "unsigned":  # stored = HU + 1024 in uint16, intercept -1024 (most CT exports)
            ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 0, -1024, 1
            ds.PixelData = np.round(hu + 1024).astype(np.uint16).tobytes()
        elif how == "slope":  # stored = 2 * HU (slope 0.5), signed
            ds.RescaleIntercept, ds.RescaleSlope = 0, 0.5
            ds.PixelData = np.round(hu * 2).astype(np.int16).tobytes()
        elif how == "rle":
            ds.compress(RLELossless)
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)


def _mask(out: Path) -> np.ndarray:
    ((uid, entry),) = read_json(out / "summary.json")["series"].items()
    assert entry["status"] == "predicted", entry
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / uid / "mask.nii.gz")))


@pytest.mark.parametrize("how", ["unsigned", "slope", "rle"])
def test_pixel_encodings_give_the_same_mask(density_package, tmp_path, write_tiny_cohort, how):
    write_tiny_cohort(tmp_path / "study", n=1)
    _recode(tmp_path / "study", tmp_path / how, how)
    pkg = str(density_package)  # finds dense tissue: a mask that is not empty to compare
    assert predict.main([str(tmp_path / "study"), str(tmp_path / "a"), "--package", pkg]) == 0
    assert predict.main([str(tmp_path / how), str(tmp_path / "b"), "--package", pkg]) == 0
    reference = _mask(tmp_path / "a")
    assert reference.any()
    np.testing.assert_array_equal(_mask(tmp_path / "b"), reference)
