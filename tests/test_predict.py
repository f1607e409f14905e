"""predict: the exported ONNX model on a new DICOM study, without PyTorch at run time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from ctpipe import config, dicomio, malignancy, synth
from ctpipe.deploy import predict, report
from ctpipe.fileio import read_json
from ctpipe.geometry import Geometry, sphere_mask
from ctpipe.postprocessing import crops

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def package(tiny_package) -> Path:
    return tiny_package


def test_outputs_on_the_source_grid_and_seg_references_series(package, tmp_path, write_tiny_cohort):
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
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert seg.NumberOfFrames == len(files)
    nodules = pd.read_csv(folder / "nodules.csv")
    assert {"coordX", "coordY", "coordZ", "diameter_mm", "score"} <= set(nodules.columns)


def test_refuses_other_modalities(package, tmp_path, write_tiny_cohort):
    write_tiny_cohort(tmp_path / "study", n=1, seed=12)
    for f in (tmp_path / "study").rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "study"), str(out), "--package", str(package)]) == 2
    assert [p.name for p in out.iterdir()] == ["summary.json"]  # no series folder, the reason
    ((uid, entry),) = read_json(out / "summary.json")["series"].items()
    assert entry["status"] == "skipped" and "modality MR" in entry["reason"], entry


def spacing_geometry(spacing_xyz) -> Geometry:
    return Geometry((0.0, 0.0, 0.0), tuple(float(v) for v in spacing_xyz))


def ct_header(**attrs) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Modality, ds.SOPClassUID = "CT", "1.2.840.10008.5.1.4.1.1.2"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_acceptance_rule_refuses_only_what_the_model_cannot_see(package):
    spec = predict.read_json(package / "input_spec.json")
    accepted = spec["accepted_input"]
    coarsest = np.asarray(accepted["max_spacing_mm"])
    assert accepted["min_extent_mm"] > 0 and "rule" in accepted
    fine = spacing_geometry(
        [0.68, 0.68, 1.25]
    )  # the most common chest protocol, finer than training
    predict.check_series(spec, ct_header(), fine, (240, 512, 512))
    thick = spacing_geometry([0.7, 0.7, max(10.0, coarsest[2] + 1)])  # 10 mm slices
    with pytest.raises(predict.RefusedSeries, match="coarser than the model can work on"):
        predict.check_series(spec, ct_header(), thick, (40, 512, 512))
    with pytest.raises(predict.RefusedSeries, match="less than"):
        predict.check_series(spec, ct_header(), fine, (20, 512, 512))
    with pytest.raises(predict.RefusedSeries, match="localizer"):
        localizer = ct_header(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
        predict.check_series(spec, localizer, fine, (240, 512, 512))
    with pytest.raises(predict.RefusedSeries, match="SOP class"):
        capture = ct_header(SOPClassUID="1.2.840.10008.5.1.4.1.1.7")  # Secondary Capture
        predict.check_series(spec, capture, fine, (240, 512, 512))


def test_fine_spacing_series_is_predicted(package, tmp_path, write_tiny_cohort):
    """A series at 0.7 mm in-plane and 1.25 mm slices (finer than the tiny plan's 5-6 mm): it is
    resampled to the plan and predicted, the mask on its own grid."""
    write_tiny_cohort(
        tmp_path / "study",
        n=1,
        seed=21,
        matrix=96,
        pixel_spacing_mm=[0.7, 0.7],
        slice_spacing_mm=[1.25],
        z_extent_mm=120,
    )
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "study"), str(out), "--package", str(package)]) == 0
    ((uid, entry),) = read_json(out / "summary.json")["series"].items()
    assert entry["status"] == "predicted", entry
    mask = sitk.ReadImage(str(out / uid / "mask.nii.gz"))
    np.testing.assert_allclose(mask.GetSpacing(), [0.7, 0.7, 1.25], atol=1e-3)


def test_series_without_type2_attributes_gets_a_valid_seg(package, tmp_path, write_tiny_cohort):
    write_tiny_cohort(tmp_path / "study", n=1, seed=13)
    missing = (
        "PatientBirthDate",
        "PatientSex",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    )
    for f in (tmp_path / "study").rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        for keyword in missing:
            delattr(ds, keyword)
        ds.save_as(f)
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "study"), str(out), "--package", str(package)]) == 0
    ((uid, entry),) = read_json(out / "summary.json")["series"].items()
    assert entry["status"] == "predicted", entry
    seg = pydicom.dcmread(out / uid / "seg.dcm")
    assert seg.Modality == "SEG" and seg.PatientBirthDate == "" and seg.AccessionNumber == ""
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    sr = pydicom.dcmread(out / uid / "sr.dcm")
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500" and sr.PatientBirthDate == ""
    nodules = pd.read_csv(out / uid / "nodules.csv")
    reported = report.read_sr(out / uid / "sr.dcm")
    assert len(reported) == len(nodules)
    cols = list(report.REPORT_COLUMNS)
    np.testing.assert_allclose(reported[cols].to_numpy(), nodules[cols].to_numpy(), atol=1e-3)


def copy_as_series(src: Path, dst: Path, **attrs) -> str:
    """Write every file of ``src`` again under ``dst`` as a new series (new UIDs), with ``attrs``."""
    uid = pydicom.uid.generate_uid()
    dst.mkdir(parents=True)
    for f in sorted(src.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(dst / f.name)
    return uid


def test_whole_study_every_series_accounted_for(package, tmp_path, write_tiny_cohort):
    """A study folder as a PACS exports it: two reconstructions, a localizer, a secondary capture,
    a dose report (no pixel data) and a stray text file."""
    write_tiny_cohort(tmp_path / "gen", n=1, seed=14)
    study = tmp_path / "study"
    (gen,) = list((tmp_path / "gen").iterdir())
    lung = copy_as_series(gen, study / "lung", SeriesDescription="Lung 1.0 B60f")
    soft = copy_as_series(gen, study / "soft", SeriesDescription="Mediastinum 1.0 B30f")
    scout = copy_as_series(gen, study / "scout", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    capture = copy_as_series(gen, study / "sc", SOPClassUID="1.2.840.10008.5.1.4.1.1.7")
    dose = pydicom.dcmread(next(gen.glob("*.dcm")))
    dose.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    dose.SeriesInstanceUID = pydicom.uid.generate_uid()
    del dose.PixelData
    dose.save_as(study / "dose.dcm")
    (study / "notes.txt").write_text("not DICOM")
    out = tmp_path / "out"
    assert predict.main([str(study), str(out), "--package", str(package)]) == 0
    summary = read_json(out / "summary.json")
    series = summary["series"]
    assert series[lung]["status"] == series[soft]["status"] == "predicted"
    assert (out / lung / "seg.dcm").is_file() and (out / soft / "seg.dcm").is_file()
    assert series[scout]["status"] == "skipped" and "localizer" in series[scout]["reason"]
    assert series[capture]["status"] == "refused" and "SOP class" in series[capture]["reason"]
    assert series[dose.SeriesInstanceUID]["status"] == "skipped", series
    assert "no pixel data" in series[dose.SeriesInstanceUID]["reason"]
    assert [f["path"] for f in summary["unused_files"]] == ["notes.txt"]
    assert summary["predicted"] == 2 and not (out / scout).exists() and not (out / capture).exists()


def test_a_failing_series_leaves_no_partial_output_and_the_others_run(
    package, tmp_path, write_tiny_cohort, monkeypatch
):
    write_tiny_cohort(tmp_path / "gen", n=1, seed=15)
    (gen,) = list((tmp_path / "gen").iterdir())
    first = copy_as_series(gen, tmp_path / "study" / "a")
    second = copy_as_series(gen, tmp_path / "study" / "b")
    real = predict.write_seg

    def fail_once(path, sources, mask, uid=None):
        if sources[0].SeriesInstanceUID == first:
            raise RuntimeError("disk full")
        return real(path, sources, mask, uid)

    monkeypatch.setattr(predict, "write_seg", fail_once)
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "study"), str(out), "--package", str(package)]) == 0
    series = read_json(out / "summary.json")["series"]
    assert (
        series[first]["status"] == "failed" and series[first]["reason"] == "RuntimeError: disk full"
    )
    assert series[second]["status"] == "predicted"
    assert sorted(p.name for p in out.iterdir()) == sorted(["summary.json", second])


@pytest.mark.slow
@pytest.mark.skipif(
    not (ROOT / "models" / "export" / "model.onnx").is_file(),
    reason="needs the trained package from `make repro` (models/export)",
)
@pytest.mark.parametrize(
    "acquisition",
    [
        {},  # the cohort's own protocol
        # the most common clinical chest protocol, far finer than training: resampled, not refused
        {"matrix": 480, "pixel_spacing_mm": (0.7, 0.7), "slice_spacing_mm": (1.25,)},
    ],
    ids=["cohort_protocol", "0.7mm_1.25mm"],
)
def test_trained_package_finds_nodules_of_an_unseen_patient(tmp_path, acquisition):
    """A patient the pipeline never saw (index beyond the cohort): its isolated solid nodules >=
    10 mm are found and the mask, in world coordinates, overlaps the truth; at the cohort's spacing
    and at 0.7 mm in-plane with 1.25 mm slices. (The harder kinds are evaluate's subgroups.)"""
    params = config.load(ROOT / "params.yaml")
    seed = params.base.seed
    cfg = synth.Cohort.from_params(params.ingest.synthetic).but(**acquisition)
    index = next(
        i
        for i in range(1000, 1100)
        if any(
            n.diameter_mm >= 10 and n.solid_fraction == 1.0 and n.kind == "isolated"
            for n in synth.make_case(seed, i, cfg).nodules
        )
    )
    rows = synth.write_case(tmp_path / "study", seed, index, cfg)
    assert (
        predict.main(
            [
                str(tmp_path / "study"),
                str(tmp_path / "out"),
                "--package",
                str(ROOT / "models" / "export"),
            ]
        )
        == 0
    )
    truth = synth.annotations_frame(rows)
    uid = truth["seriesuid"].iloc[0]
    found = pd.read_csv(tmp_path / "out" / uid / "nodules.csv")
    reported = report.read_sr(tmp_path / "out" / uid / "sr.dcm")  # the SR says what the CSV says
    input_spec = read_json(ROOT / "models" / "export" / "input_spec.json")
    second = input_spec["classifier"]
    # the candidate classifier's probability too, and the malignancy model's
    cols = [*report.REPORT_COLUMNS, "classifier", "malignancy"]
    assert len(found) > 0 and list(reported.columns) == cols
    np.testing.assert_allclose(reported[cols].to_numpy(), found[cols].to_numpy(), atol=1e-3)
    combined = crops.combine(found["seg_score"], found["classifier"], second["weight"])
    np.testing.assert_allclose(found["score"], combined, atol=1e-3)
    third = malignancy.MalignancyModel.from_dict(input_spec["malignancy"], "input_spec.json")
    if not any(third.coef[1:]):  # the diameter's model: the probability follows the diameter
        figures = found.assign(log_diameter=np.log(found["diameter_mm"]), solid_share=0.0)
        expected = third.probability(figures.assign(margin_share=0.0))
        np.testing.assert_allclose(found["malignancy"], expected, atol=2e-3)
    mask_img = sitk.ReadImage(str(tmp_path / "out" / uid / "mask.nii.gz"))
    if acquisition:  # the mask is on the series' own fine grid
        np.testing.assert_allclose(mask_img.GetSpacing(), [0.7, 0.7, 1.25], atol=1e-3)
    mask, geom = sitk.GetArrayFromImage(mask_img) > 0, Geometry.from_sitk(mask_img)
    solid = [
        n.solid_fraction == 1.0 and n.kind == "isolated"
        for n in synth.make_case(seed, index, cfg).nodules
    ]
    assert len(solid) == len(truth)
    for _, nod in truth[(truth["diameter_mm"] >= 10).to_numpy() & np.array(solid)].iterrows():
        centre = nod[["coordX", "coordY", "coordZ"]].to_numpy(float)
        dist = np.linalg.norm(
            found[["coordX", "coordY", "coordZ"]].to_numpy(float) - centre, axis=1
        )
        assert (dist < nod["diameter_mm"] / 2).any(), f"missed nodule of {nod['diameter_mm']} mm"
        sphere = sphere_mask(mask.shape, geom, centre, nod["diameter_mm"] / 2)
        assert (mask & sphere).sum() > 0.3 * sphere.sum()


def test_a_uid_seed_makes_the_same_seg_and_sr_and_none_makes_new_ones(
    density_package, tmp_path, write_tiny_cohort
):
    """A job run twice (a redelivered message) must give the PACS the same objects: with the
    same ``uid_seed`` the SEG's and SR's UIDs are equal, with another seed or none they differ."""
    write_tiny_cohort(tmp_path / "study", n=1, seed=12)
    files = sorted((tmp_path / "study").rglob("*.dcm"))
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    runs = {"a": "job-1/fp32-x", "b": "job-1/fp32-x", "c": "job-2/fp32-x", "d": None}
    seen = {}
    for name, seed in runs.items():
        predict.predict_series(files, density_package, "fp32", tmp_path / name, seed)
        seg = pydicom.dcmread(tmp_path / name / uid / "seg.dcm")
        sr = pydicom.dcmread(tmp_path / name / uid / "sr.dcm")
        seen[name] = (seg.SOPInstanceUID, seg.SeriesInstanceUID, sr.SOPInstanceUID,
                      sr.SeriesInstanceUID)  # fmt: skip
        assert sr.CurrentRequestedProcedureEvidenceSequence  # the SR still references the SEG
        assert len(set(seen[name])) == 4
    assert seen["a"] == seen["b"]
    for other in ("c", "d"):
        assert not set(seen["a"]) & set(seen[other]), other


def predict_with(package: Path, spec_part: dict, study: Path, out: Path, write_tiny_cohort):
    """``package`` with ``spec_part`` added to its input_spec.json, run on a tiny one-series study
    written to ``study``; that series' nodules.csv and SR as read back."""
    from ctpipe.fileio import write_json

    write_json(package / "input_spec.json", {**read_json(package / "input_spec.json"), **spec_part})
    write_tiny_cohort(study, n=1, seed=12)
    files = sorted(study.rglob("*.dcm"))
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    predict.predict_series(files, package, "fp32", out)
    return pd.read_csv(out / uid / "nodules.csv"), report.read_sr(out / uid / "sr.dcm")


def test_a_package_with_the_classifier_scores_and_reports_each_nodule(
    density_package, tmp_path, write_tiny_cohort
):
    """classifier.onnx in the package (as export writes it): nodules.csv gains the classifier's
    probability and the segmentation's score, the score combines them, and the SR carries the
    probability of each nodule ("Probability", DCM 122157) as nodules.csv has it."""
    import shutil

    import torch

    from ctpipe import classifier
    from ctpipe.deploy import spec

    package = tmp_path / "pkg"
    shutil.copytree(density_package, package)
    torch.manual_seed(0)
    model = classifier.CandidateClassifier(
        classifier.make_net((8, 8, 8), [4, 8]), (8, 8, 8), 8, 0.5
    )
    model.export_onnx(package / "classifier.onnx", 18)
    found, reported = predict_with(
        package,
        {"classifier": spec.classifier_spec(model)},
        tmp_path / "study",
        tmp_path / "out",
        write_tiny_cohort,
    )
    assert len(found) > 0 and found["classifier"].between(0, 1).all()
    np.testing.assert_allclose(
        found["score"], crops.combine(found["seg_score"], found["classifier"], 0.5), atol=1e-3
    )
    assert found["score"].is_monotonic_decreasing
    cols = [*report.REPORT_COLUMNS, "classifier"]
    assert list(reported.columns) == cols
    np.testing.assert_allclose(reported[cols].to_numpy(), found[cols].to_numpy(), atol=1e-3)


def test_a_package_with_a_malignancy_model_rates_and_reports_each_nodule(
    density_package, tmp_path, write_tiny_cohort
):
    """input_spec.json's 'malignancy' (as export writes it): nodules.csv gains the model's
    probability from each nodule's figures, bigger nodules rated higher by a model that weighs
    the diameter alone, and the SR carries it ("Probability of cancer", DCM 111047)."""
    import shutil

    from ctpipe import malignancy

    package = tmp_path / "pkg"
    shutil.copytree(density_package, package)
    model = malignancy.MalignancyModel(
        features=malignancy.FEATURES,
        mean=(2.0, 0.5, 0.1),
        scale=(0.5, 0.3, 0.1),
        coef=(1.0, 0.0, 0.0),
        intercept=0.0,
    )
    part = {"malignancy": dataclasses.asdict(model)}
    found, reported = predict_with(
        package, part, tmp_path / "study", tmp_path / "out", write_tiny_cohort
    )
    assert len(found) > 0 and found["malignancy"].between(0, 1).all()
    expected = 1 / (1 + np.exp(-(np.log(found["diameter_mm"]) - 2.0) / 0.5))
    np.testing.assert_allclose(found["malignancy"], expected, atol=2e-3)
    cols = [*report.REPORT_COLUMNS, "malignancy"]
    assert list(reported.columns) == cols
    np.testing.assert_allclose(reported[cols].to_numpy(), found[cols].to_numpy(), atol=1e-3)
    # a spec whose model is not one this code reads is refused, naming it
    bad = {"malignancy": {**part["malignancy"], "scale": [0, 1, 1]}}
    with pytest.raises(ValueError, match="input_spec.json: 'malignancy': non-finite values or"):
        predict_with(package, bad, tmp_path / "s2", tmp_path / "again", write_tiny_cohort)
