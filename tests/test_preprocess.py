"""Preprocess: geometry survives oblique grids and shuffled files, LUNA16 MetaImages give the same
masks as DICOM, the split keeps each patient's series together, and a re-run writes
byte-identical outputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from ctpipe import dicomio, synth
from ctpipe.geometry import Geometry
from ctpipe.model import data
from stages import ingest, preprocess


@pytest.fixture
def ingest_like(write_tiny_cohort):
    """``ingest_like(root, n=3, **synth_overrides)``: a folder laid out as ingest/anonymize write
    it (dicom/ + annotations.csv); returns ``root``."""

    def make(root: Path, n: int = 3, **overrides) -> Path:
        rows = write_tiny_cohort(root / "dicom", n=n, **overrides)
        synth.annotations_frame(rows).to_csv(root / "annotations.csv", index=False)
        return root

    return make


def run_preprocess(in_dir: Path, out: Path, params_file: Path, **changes) -> dict:
    params = yaml.safe_load(params_file.read_text())
    params["base"]["workers"] = changes.pop("workers", params["base"]["workers"])
    params["preprocess"].update(changes)
    params_file.write_text(yaml.safe_dump(params))
    metrics = out.parent / f"{out.name}.json"
    assert (
        preprocess.main(
            [str(in_dir), str(out), "--params", str(params_file), "--metrics", str(metrics)]
        )
        == 0
    )
    return json.loads(metrics.read_text())


def to_sitk(array: np.ndarray, geom: Geometry) -> sitk.Image:
    return geom.apply_to(sitk.GetImageFromArray(array.astype(np.float32)))


def world_dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice after resampling ``b`` onto ``a``'s grid (nearest neighbour), i.e. in world space."""
    b_on_a = sitk.GetArrayFromImage(
        sitk.Resample(b, a, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0)
    )
    a_arr = sitk.GetArrayFromImage(a)
    return (
        2
        * float(((a_arr > 0) & (b_on_a > 0)).sum())
        / float((a_arr > 0).sum() + (b_on_a > 0).sum())
    )


def test_oblique_and_scrambled_files_give_same_world_masks(
    tmp_path, params_file, ingest_like, scramble_slice_order
):
    """The same patients on an axial grid and on an oblique one whose files have names and
    InstanceNumbers in random orders: the masks agree in world space and sit on the nodules."""
    cohorts = {
        "axial": ingest_like(tmp_path / "axial"),
        "oblique": ingest_like(tmp_path / "oblique", oblique_degrees=25),
    }
    for seed, study in enumerate(sorted((cohorts["oblique"] / "dicom").iterdir())):
        scramble_slice_order(study, seed)
    # Same target spacing for both, so that voxel counts are comparable; fine enough that a 12 mm
    # nodule has some 35 voxels, so that the Dice measures geometry rather than rounding.
    for name, folder in cohorts.items():
        run_preprocess(folder, tmp_path / f"{name}_out", params_file, target_spacing_mm=[3.0] * 3)
    a_idx, o_idx = (data.load_index(tmp_path / f"{n}_out") for n in ("axial", "oblique"))
    assert [c["seriesuid"] for c in a_idx["cases"]] == [c["seriesuid"] for c in o_idx["cases"]]
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


def test_luna16_metaimage_gives_same_masks_as_dicom(tmp_path, params_file, ingest_like):
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
    assert (
        ingest.main(
            [
                str(tmp_path / "luna_raw"),
                "--params",
                str(params_file),
                "--metrics",
                str(tmp_path / "ingest.json"),
            ]
        )
        == 0
    )
    manifest = pd.read_csv(tmp_path / "luna_raw" / "manifest.csv", keep_default_na=False)
    assert set(manifest["path"]) == {
        str(p.relative_to(luna.parent))
        for p in luna.parent.rglob("*")
        if p.is_file() and p.name != "annotations.csv"
    }
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


def test_rerun_is_byte_identical(tmp_path, params_file, ingest_like):
    root = ingest_like(tmp_path / "cohort", n=3)

    def digest(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    first = run_preprocess(root, tmp_path / "one", params_file, workers=2)
    second = run_preprocess(root, tmp_path / "two", params_file, workers=1)
    assert first == second
    assert digest(tmp_path / "one") == digest(tmp_path / "two")


def several_series_per_patient(root: Path, cfg: synth.Cohort, patients: int, visits: int) -> dict:
    """A cohort where each patient has ``visits`` studies (other seeds draw other scans under the
    same identity), as ingest/anonymize lay it out; return {SeriesInstanceUID: PatientID}."""
    owner, rows = {}, []
    for i in range(patients):
        phi = synth.make_phi(np.random.default_rng([100, i]), i)
        for visit in range(visits):
            case = synth.make_case(7 + visit, i, cfg)
            case.phi = phi
            uid, _ = synth.write_study(case, root / "dicom" / f"visit{visit}", 7 + visit)
            owner[uid] = phi["PatientID"]
            rows += synth.annotation_rows(uid, case.nodules)
    synth.annotations_frame(rows).to_csv(root / "annotations.csv", index=False)
    return owner


def test_split_is_by_patient_and_nodules_reported(tmp_path, params_file, tiny_synth):
    root = tmp_path / "cohort"
    owner = several_series_per_patient(root, tiny_synth, patients=4, visits=3)
    assert len(owner) == 12 and len(set(owner.values())) == 4
    # An annotation outside every volume is reported, not silently dropped.
    ann = pd.read_csv(root / "annotations.csv")
    far = ann.iloc[[0]].assign(coordZ=ann["coordZ"].iloc[0] + 5000)
    pd.concat([ann, far]).to_csv(root / "annotations.csv", index=False)
    metrics = run_preprocess(root, tmp_path / "out", params_file)
    assert metrics["nodules_outside_volume"] == 1
    nodules = pd.read_csv(tmp_path / "out" / "nodules.csv")
    assert (~nodules["inside"]).sum() == 1
    index = data.load_index(tmp_path / "out")
    assert {c["seriesuid"] for c in index["cases"]} == set(owner)
    # Each patient's three series land in one split (the patients as written, not as recorded).
    by_patient: dict[str, set[str]] = {}
    for case in index["cases"]:
        by_patient.setdefault(owner[case["seriesuid"]], set()).add(case["split"])
    spanning = {p: sorted(s) for p, s in by_patient.items() if len(s) > 1}
    assert not spanning, f"patients in more than one split: {spanning}"
    assert sorted(s for (s,) in by_patient.values()) == ["test", "train", "train", "val"]
    assert all(c["patient_id"] == owner[c["seriesuid"]] for c in index["cases"])
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert sorted(p for name in ("train", "val", "test") for p in splits[name]) == sorted(
        by_patient
    )
