"""predict: the exported ONNX model on a new DICOM study, without PyTorch at run time."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import torch
import yaml

from conftest import ROOT, write_tiny_cohort
from ctpipe import dicomio, nets, predict, prep, synth
from ctpipe.fileio import write_json
from ctpipe.geometry import Geometry, sphere_mask
from ctpipe.onnxtools import export_onnx
from stages import export

TINY_NET = {"context_slices": 1, "features": [4, 4, 8, 8, 16, 4], "patch_size": 32}


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    """A model package as export writes it, around a random tiny network (mechanics, not skill)."""
    root = tmp_path_factory.mktemp("pkg")
    torch.manual_seed(0)
    export_onnx(nets.build_network(TINY_NET), nets.in_channels(TINY_NET), root / "model.onnx", 18)
    shutil.copy(root / "model.onnx", root / "model_int8.onnx")
    write_tiny_cohort(root / "fp", n=1, seed=3)
    manifest = dicomio.scan_folder(root / "fp")
    (uid, paths), = dicomio.series_files(manifest).items()
    cfg = yaml.safe_load((ROOT / "params.yaml").read_text())["preprocess"]
    source = {"kind": "dicom", "index": 0, "paths": [str(root / "fp" / p) for p in paths]}
    plan = prep.make_plan([prep.fingerprint_case(source, synth.annotations_frame([]), cfg, 0)], cfg)
    inference = {"roi_size": 64, "overlap": 0.5, "threshold": 0.5, "component_threshold": 0.5,
                 "min_candidate_mm3": 1, "shape_weight": 2.0,
                 "views": ["axial", "coronal", "sagittal"],
                 "mirror_axes": [0, 1]}
    write_json(root / "input_spec.json", export.input_spec({"train_params": TINY_NET}, plan, inference))
    return root


def test_outputs_on_the_source_grid_and_seg_references_series(package, tmp_path):
    write_tiny_cohort(tmp_path / "study", n=1, seed=11)
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "study"), str(out), "--package", str(package)]) == 0
    files = sorted((tmp_path / "study").rglob("*.dcm"))
    first = pydicom.dcmread(files[0])
    folder = out / first.SeriesInstanceUID
    volume, geom = dicomio.read_series(files)
    mask = sitk.ReadImage(str(folder / "mask.nii.gz"))
    assert mask.GetSize() == volume.shape[::-1]
    np.testing.assert_allclose(mask.GetOrigin(), geom.origin, atol=1e-3)
    np.testing.assert_allclose(np.reshape(mask.GetDirection(), (3, 3)), geom.direction, atol=1e-6)
    seg = pydicom.dcmread(folder / "seg.dcm")
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert seg.NumberOfFrames == len(files)
    nodules = pd.read_csv(folder / "nodules.csv")
    assert {"coordX", "coordY", "coordZ", "diameter_mm", "score"} <= set(nodules.columns)


def test_refuses_other_modalities(package, tmp_path):
    write_tiny_cohort(tmp_path / "study", n=1, seed=12)
    for f in (tmp_path / "study").rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    assert predict.main([str(tmp_path / "study"), str(tmp_path / "out"), "--package", str(package)]) == 2
    assert not (tmp_path / "out").exists()


def test_refuses_spacing_far_outside_training(package):
    spec = predict.read_json(package / "input_spec.json")
    first = pydicom.Dataset()
    first.Modality = "CT"
    with pytest.raises(predict.RefusedSeries, match="spacing"):
        predict.check_series(spec, first, Geometry((0, 0, 0), (20.0, 20.0, 40.0)))


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "models" / "export" / "model.onnx").is_file(),
                    reason="needs the trained package from `make repro` (models/export)")
def test_trained_package_finds_nodules_of_an_unseen_patient(tmp_path):
    """A patient the pipeline never saw (index beyond the cohort): nodules >= 10 mm are found and
    the mask, in world coordinates, overlaps the truth."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = params["ingest"]["synthetic"]
    index = next(i for i in range(1000, 1100)
                 if any(n.diameter_mm >= 10 for n in synth.make_case(params["base"]["seed"], i, cfg).nodules))
    rows = synth.write_case(tmp_path / "study", params["base"]["seed"], index, cfg)
    assert predict.main([str(tmp_path / "study"), str(tmp_path / "out"), "--package",
                         str(ROOT / "models" / "export")]) == 0
    truth = synth.annotations_frame(rows)
    uid = truth["seriesuid"].iloc[0]
    found = pd.read_csv(tmp_path / "out" / uid / "nodules.csv")
    mask_img = sitk.ReadImage(str(tmp_path / "out" / uid / "mask.nii.gz"))
    mask, geom = sitk.GetArrayFromImage(mask_img) > 0, Geometry.from_sitk(mask_img)
    for _, nod in truth[truth["diameter_mm"] >= 10].iterrows():
        centre = nod[["coordX", "coordY", "coordZ"]].to_numpy(float)
        dist = np.linalg.norm(found[["coordX", "coordY", "coordZ"]].to_numpy(float) - centre, axis=1)
        assert (dist < nod["diameter_mm"] / 2).any(), f"missed nodule of {nod['diameter_mm']} mm"
        sphere = sphere_mask(mask.shape, geom, centre, nod["diameter_mm"] / 2)
        assert (mask & sphere).sum() > 0.3 * sphere.sum()
