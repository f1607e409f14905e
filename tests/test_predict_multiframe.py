"""predict on an Enhanced CT multi-frame file: one file, one series, a SEG and an SR."""

from __future__ import annotations

import numpy as np
import pydicom
import SimpleITK as sitk
from test_dicomio import single_frame_series, to_multiframe

from ctpipe.deploy import predict, report
from ctpipe.fileio import read_json


def test_enhanced_ct_multiframe_is_predicted_like_its_single_frames(
    tiny_package, tmp_path, write_tiny_cohort
):
    files = single_frame_series(tmp_path, write_tiny_cohort)
    multi = to_multiframe(files, tmp_path / "multi" / "enhanced.dcm")
    out_single, out_multi = tmp_path / "out_single", tmp_path / "out_multi"
    assert (
        predict.main([str(tmp_path / "single"), str(out_single), "--package", str(tiny_package)])
        == 0
    )
    assert predict.main([str(multi.parent), str(out_multi), "--package", str(tiny_package)]) == 0
    ((uid, entry),) = read_json(out_multi / "summary.json")["series"].items()
    assert entry["status"] == "predicted", entry
    ((single_uid, _),) = read_json(out_single / "summary.json")["series"].items()
    # the same voxels on the same grid: the same mask
    a = sitk.ReadImage(str(out_single / single_uid / "mask.nii.gz"))
    b = sitk.ReadImage(str(out_multi / uid / "mask.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    seg = pydicom.dcmread(out_multi / uid / "seg.dcm")
    assert seg.NumberOfFrames == pydicom.dcmread(multi, stop_before_pixels=True).NumberOfFrames
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    report.read_sr(out_multi / uid / "sr.dcm")  # a valid TID 1500 report
