"""Preprocess: geometry survives oblique grids and shuffled files, LUNA16 MetaImages give the same
masks as DICOM, and a re-run writes byte-identical outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml

from conftest import write_tiny_cohort
from ctpipe import data, dicomio, synth
from ctpipe.geometry import Geometry
from stages import ingest, preprocess


def ingest_like(root: Path, n: int = 3, **overrides) -> Path:
    """A folder laid out as ingest/anonymize write it: dicom/ + annotations.csv."""
    rows = write_tiny_cohort(root / "dicom", n=n, **overrides)
    synth.annotations_frame(rows).to_csv(root / "annotations.csv", index=False)
    return root


def run_preprocess(in_dir: Path, out: Path, params_file: Path, **changes) -> dict:
    params = yaml.safe_load(params_file.read_text())
    params["preprocess"].update(changes)
    params_file.write_text(yaml.safe_dump(params))
    metrics = out.parent / f"{out.name}.json"
    assert preprocess.main([str(in_dir), str(out), "--params", str(params_file), "--metrics", str(metrics)]) == 0
    return json.loads(metrics.read_text())


def to_sitk(array: np.ndarray, geom: Geometry) -> sitk.Image:
    return geom.apply_to(sitk.GetImageFromArray(array.astype(np.float32)))


def world_dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice after resampling ``b`` onto ``a``'s grid (nearest neighbour), i.e. in world space."""
    b_on_a = sitk.GetArrayFromImage(sitk.Resample(b, a, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0))
    a_arr = sitk.GetArrayFromImage(a)
    return 2 * float(((a_arr > 0) & (b_on_a > 0)).sum()) / float((a_arr > 0).sum() + (b_on_a > 0).sum())


def test_oblique_and_reversed_files_give_same_world_masks(tmp_path, params_file):
    axial = ingest_like(tmp_path / "axial")
    oblique = ingest_like(tmp_path / "oblique", oblique_degrees=25)
    for study in (oblique / "dicom").iterdir():  # file names in reverse slice order
        files = sorted(study.glob("*.dcm"))
        for i, f in enumerate(files):
            f.rename(study / f"tmp{len(files) - i:04d}.dcm")
    # Same target spacing for both, so that voxel counts are comparable.
    for name in ("axial", "oblique"):
        run_preprocess(tmp_path / name, tmp_path / f"{name}_out", params_file, target_spacing_mm=[4.0, 4.0, 4.0])
    a_idx, o_idx = (data.load_index(tmp_path / f"{n}_out") for n in ("axial", "oblique"))
    for a_case, o_case in zip(a_idx["cases"], o_idx["cases"]):
        a_img, a_lbl, a_geom = data.load_case(tmp_path / "axial_out", a_case["case_id"])
        o_img, o_lbl, o_geom = data.load_case(tmp_path / "oblique_out", o_case["case_id"])
        assert not np.allclose(o_geom.direction, np.eye(3))
        assert a_lbl.sum() > 0 and o_lbl.sum() > 0
        assert world_dice(to_sitk(a_lbl, a_geom), to_sitk(o_lbl, o_geom)) > 0.8
        # The mask sits on the nodule in the image, on both grids: a mask misplaced by a geometry
        # bug lands in lung (-850 HU); the nodules average at least 200 HU above that.
        for out, img, lbl in (("axial_out", a_img, a_lbl), ("oblique_out", o_img, o_lbl)):
            norm = data.load_plan(tmp_path / out)["normalization"]
            lung = (-850 - norm["mean"]) / norm["std"]
            inside = np.asarray(img, dtype=np.float32)[np.asarray(lbl) > 0].mean()
            assert inside > lung + 200 / norm["std"]


def test_luna16_metaimage_gives_same_masks_as_dicom(tmp_path, params_file):
    dicom_root = ingest_like(tmp_path / "dicom_cohort", n=2)
    luna = tmp_path / "luna_cohort" / "images"
    luna.mkdir(parents=True)
    manifest = dicomio.scan_folder(dicom_root / "dicom")
    for uid, paths in dicomio.series_files(manifest).items():
        volume, geom = dicomio.read_series([dicom_root / "dicom" / p for p in paths])
        sitk.WriteImage(to_sitk(volume, geom), str(luna / f"{uid}.mhd"))
    pd.read_csv(dicom_root / "annotations.csv").to_csv(luna.parent / "annotations.csv", index=False)
    (luna.parent / "README.txt").write_text("not part of the cohort")
    # The LUNA16 folder goes through ingest (source luna16), then preprocess.
    params = yaml.safe_load(params_file.read_text())
    params["ingest"].update(source="luna16", source_dir=str(luna.parent))
    params_file.write_text(yaml.safe_dump(params))
    assert ingest.main([str(tmp_path / "luna_raw"), "--params", str(params_file),
                        "--metrics", str(tmp_path / "ingest.json")]) == 0
    manifest = pd.read_csv(tmp_path / "luna_raw" / "manifest.csv", keep_default_na=False)
    assert set(manifest["path"]) == {str(p.relative_to(luna.parent)) for p in luna.parent.rglob("*")
                                     if p.is_file() and p.name != "annotations.csv"}
    assert manifest.set_index("path").loc["README.txt", "status"] == "skipped"
    run_preprocess(dicom_root, tmp_path / "from_dicom", params_file)
    run_preprocess(tmp_path / "luna_raw", tmp_path / "from_luna", params_file)
    d_idx, l_idx = data.load_index(tmp_path / "from_dicom"), data.load_index(tmp_path / "from_luna")
    assert [c["seriesuid"] for c in d_idx["cases"]] == [c["seriesuid"] for c in l_idx["cases"]]
    for d_case, l_case in zip(d_idx["cases"], l_idx["cases"]):
        _, d_lbl, d_geom = data.load_case(tmp_path / "from_dicom", d_case["case_id"])
        _, l_lbl, l_geom = data.load_case(tmp_path / "from_luna", l_case["case_id"])
        assert d_lbl.shape == l_lbl.shape and np.array_equal(d_lbl, l_lbl)
        np.testing.assert_allclose(d_geom.origin, l_geom.origin, atol=1e-4)


def test_rerun_is_byte_identical(tmp_path, params_file):
    root = ingest_like(tmp_path / "cohort", n=3)

    def digest(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    first = run_preprocess(root, tmp_path / "one", params_file, workers=2)
    second = run_preprocess(root, tmp_path / "two", params_file, workers=1)
    assert first == second
    assert digest(tmp_path / "one") == digest(tmp_path / "two")


def test_split_is_by_patient_and_nodules_reported(tmp_path, params_file):
    root = ingest_like(tmp_path / "cohort", n=4)
    # An annotation outside every volume is reported, not silently dropped.
    ann = pd.read_csv(root / "annotations.csv")
    far = ann.iloc[[0]].assign(coordZ=ann["coordZ"].iloc[0] + 5000)
    pd.concat([ann, far]).to_csv(root / "annotations.csv", index=False)
    metrics = run_preprocess(root, tmp_path / "out", params_file)
    assert metrics["nodules_outside_volume"] == 1
    nodules = pd.read_csv(tmp_path / "out" / "nodules.csv")
    assert (~nodules["inside"]).sum() == 1
    index = data.load_index(tmp_path / "out")
    by_patient = {}
    for case in index["cases"]:
        by_patient.setdefault(case["patient_id"], set()).add(case["split"])
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert {c["split"] for c in index["cases"]} == {"train", "val", "test"}
