"""Values from data never decide a path (the issue: a SeriesInstanceUID of ``..`` made predict
delete every file of OUT_DIR's parent). Hostile UIDs in headers, file names that become names,
MetaImage data-file names, ``export.model_name`` and OUT_DIR, at every entry point that writes or
deletes: predict, ingest, anonymize, export. Each value is refused with a reason, the rest goes
through, and ``escape_guard`` turns anything deleted, moved or created outside the test folder into
a failure instead of damage (``/`` reaches ``shutil.rmtree`` in the old predict)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml
from pydicom import config

from ctpipe import config as ctpipe_config
from ctpipe import synth
from ctpipe.deid.keys import KEY_ENV
from ctpipe.deploy import build, predict
from ctpipe.fileio import read_json
from ctpipe.postprocessing.candidates import Chosen
from ctpipe.safepath import UnsafePath
from stages import anonymize, ingest

pytestmark = [
    pytest.mark.usefixtures("escape_guard"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:The value length"),
]
ABSOLUTE = "<absolute>"  # stands for tmp_path / "victim", a folder with a file that must survive
HOSTILE = {
    "dotdot": "..",
    "dot": ".",
    "slash": "/",
    "absolute": ABSOLUTE,
    "nul": "1.2\x00.3",
    "digits65": "1" * 65,
}
# (header attribute, hostile value): every value as the series UID, the others once each
UID_CASES = [("SeriesInstanceUID", key) for key in HOSTILE] + [
    ("StudyInstanceUID", "dotdot"),
    ("SOPInstanceUID", "slash"),
]


def hostile(key: str, tmp_path: Path) -> str:
    """The value of ``HOSTILE[key]``; the absolute path is a victim folder under ``tmp_path``."""
    if HOSTILE[key] != ABSOLUTE:
        return HOSTILE[key]
    victim = tmp_path / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "keep.txt").write_text("must survive")
    return str(victim)


def victim_intact(tmp_path: Path) -> bool:
    victim = tmp_path / "victim"
    return not victim.exists() or [p.name for p in victim.iterdir()] == ["keep.txt"]


def copy_series(src: Path, dst: Path, **attrs) -> str:
    """Every file of ``src`` again under ``dst`` as a new series with new SOP UIDs, then ``attrs``
    (written as they are: pydicom's write validation is off for the hostile values)."""
    uid = pydicom.uid.generate_uid()
    dst.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.settings.writing_validation_mode = config.IGNORE
        try:
            for f in sorted(src.rglob("*.dcm")):
                ds = pydicom.dcmread(f)
                ds.SeriesInstanceUID = uid
                ds.SOPInstanceUID = pydicom.uid.generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                for keyword, value in attrs.items():
                    setattr(ds, keyword, value)
                ds.save_as(dst / f.name)
        finally:
            config.settings.writing_validation_mode = config.WARN
    return attrs.get("SeriesInstanceUID", uid)


@pytest.fixture
def study(tmp_path, write_tiny_cohort):
    """``study(**attrs)``: a folder with one valid series (``good/``) and one written with
    ``attrs`` (``bad/``); returns (folder, valid series UID, annotation rows)."""

    def make(**attrs) -> tuple[Path, str, list[dict]]:
        rows = write_tiny_cohort(tmp_path / "gen", n=1, seed=15)
        (gen,) = list((tmp_path / "gen").iterdir())
        good = copy_series(gen, tmp_path / "study" / "good")
        copy_series(gen, tmp_path / "study" / "bad", **attrs)
        return tmp_path / "study", good, rows

    return make


@pytest.mark.parametrize("key", HOSTILE)
def test_predict_refuses_a_series_uid_that_is_not_a_uid(key, study, tiny_package, tmp_path):
    uid = hostile(key, tmp_path)
    folder, good, _ = study(SeriesInstanceUID=uid)
    work = tmp_path / "work"
    work.mkdir()
    (work / "sibling.txt").write_text("OUT_DIR's neighbour")
    out = work / "out"
    assert predict.main([str(folder), str(out), "--package", str(tiny_package)]) == 0
    assert sorted(p.name for p in work.iterdir()) == ["out", "sibling.txt"]
    assert victim_intact(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == sorted(["summary.json", good])
    series = read_json(out / "summary.json")["series"]
    assert series[uid]["status"] == "refused", series[uid]
    assert series[uid]["reason"].startswith("SeriesInstanceUID: ")
    assert series[good]["status"] == "predicted"


def ingest_argv(tmp_path: Path, params: dict, **ingest_cfg) -> list[str]:
    params["ingest"].update(ingest_cfg)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return [str(tmp_path / "raw"), "--params", str(path), "--metrics", str(tmp_path / "i.json")]


@pytest.mark.parametrize(("keyword", "key"), UID_CASES)
def test_ingest_skips_files_whose_uid_is_not_a_uid(keyword, key, study, tiny_params, tmp_path):
    folder, good, rows = study(**{keyword: hostile(key, tmp_path)})
    synth.annotations_frame(rows).to_csv(tmp_path / "annotations.csv", index=False)
    argv = ingest_argv(
        tmp_path,
        tiny_params(),
        source="dicom",
        source_dir=str(folder),
        annotations=str(tmp_path / "annotations.csv"),
    )
    assert ingest.main(argv) == 0
    manifest = pd.read_csv(tmp_path / "raw" / "manifest.csv", keep_default_na=False)
    bad = manifest[manifest["path"].str.startswith("bad/")]
    assert len(bad) and set(bad["status"]) == {"skipped"}, bad
    assert bad["reason"].str.startswith(f"{keyword}: ").all(), bad["reason"].tolist()
    ok = manifest[manifest["status"] == "ok"]
    assert set(ok["series_uid"]) == {good} and ok["path"].str.startswith("good/").all()
    copied = {
        str(p.relative_to(tmp_path / "raw" / "dicom")) for p in (tmp_path / "raw").rglob("*.dcm")
    }
    assert copied == set(ok["path"]) and victim_intact(tmp_path)


def luna16_source(tmp_path: Path, write_tiny_cohort) -> tuple[Path, str]:
    """``luna/images/<uid>.mhd`` + ``.raw`` of a tiny series, ``luna/annotations.csv``, and a copy
    of the data file outside the source (``tmp_path/outside.raw``); returns (source, uid)."""
    import SimpleITK as sitk

    write_tiny_cohort(tmp_path / "gen", n=1, seed=16)
    (gen,) = list((tmp_path / "gen").iterdir())
    images = tmp_path / "luna" / "images"
    images.mkdir(parents=True)
    uid = pydicom.dcmread(next(gen.glob("*.dcm"))).SeriesInstanceUID
    sitk.WriteImage(
        sitk.ReadImage([str(p) for p in sorted(gen.glob("*.dcm"))]), str(images / f"{uid}.mhd")
    )
    pd.DataFrame(columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]).to_csv(
        tmp_path / "luna" / "annotations.csv", index=False
    )
    (tmp_path / "outside.raw").write_bytes((images / f"{uid}.raw").read_bytes())
    return tmp_path / "luna", uid


def plant_mhd(source: Path, uid: str, name: str, data_file: str | None = None) -> str:
    """A copy of ``<uid>.mhd`` named ``name``, its ElementDataFile set to ``data_file`` (default:
    the valid series' data file); returns its manifest path."""
    text = (source / "images" / f"{uid}.mhd").read_text()
    if data_file is not None:
        text = text.replace(f"ElementDataFile = {uid}.raw", f"ElementDataFile = {data_file}")
    (source / "images" / name).write_text(text)
    return f"images/{name}"


# (file name, ElementDataFile, reason): file names that are no UID, data files out of the source
LUNA_CASES = {
    "name_dotdot": ("...mhd", None, "file name is not a series UID"),  # stem '..'
    "name_dot": ("..mhd", None, "file name is not a series UID"),  # stem '.'
    "name_digits65": ("1" * 65 + ".mhd", None, "file name is not a series UID"),
    "data_dotdot": ("1.2.3.mhd", "..", "is not inside"),
    "data_dot": ("1.2.3.mhd", ".", "unreadable MetaImage"),  # the images folder: no data
    "data_slash": ("1.2.3.mhd", "/", "is not inside"),
    "data_absolute": ("1.2.3.mhd", ABSOLUTE, "is not inside"),
    "data_parent": ("1.2.3.mhd", "../../outside.raw", "is not inside"),
    "data_nul": ("1.2.3.mhd", "a\x00.raw", "NUL"),
}


@pytest.mark.parametrize("case", LUNA_CASES)
def test_ingest_luna16_refuses_names_and_data_files_that_leave_the_source(
    case, tiny_params, tmp_path, write_tiny_cohort
):
    source, uid = luna16_source(tmp_path, write_tiny_cohort)
    name, data_file, reason = LUNA_CASES[case]
    if data_file == ABSOLUTE:
        data_file = str(tmp_path / "outside.raw")
    rel = plant_mhd(source, uid, name, data_file)
    argv = ingest_argv(tmp_path, tiny_params(), source="luna16", source_dir=str(source))
    assert ingest.main(argv) == 0
    manifest = pd.read_csv(tmp_path / "raw" / "manifest.csv", keep_default_na=False)
    by_path = manifest.set_index("path")
    assert by_path.loc[rel, "status"] == "skipped" and reason in by_path.loc[rel, "reason"]
    assert by_path.loc[f"images/{uid}.mhd", "status"] == "ok"
    copied = sorted(p.name for p in (tmp_path / "raw" / "images").iterdir())
    assert copied == [f"{uid}.mhd", f"{uid}.raw"]  # nothing of the hostile file, nothing outside


ANON_KEY = "pytest-secret-key-0123456789-abcdefXYZ"


def run_anonymize(raw: Path, tmp_path: Path, tiny_params) -> tuple[int, pd.DataFrame, dict]:
    """The stage on ``raw`` (a plain folder, or ingest's layout) with a key; returns the exit
    code, the private quarantine list and the metrics."""
    params = tiny_params()
    params["anonymize"].update(key_file="")
    (tmp_path / "anon.yaml").write_text(yaml.safe_dump(params))
    out, private = tmp_path / "anon", tmp_path / "anon_private"
    code = anonymize.main(
        [str(raw), str(out), "--private-dir", str(private), "--params", str(tmp_path / "anon.yaml")]
        + ["--metrics", str(tmp_path / "anon.json")]
    )
    quarantine = pd.read_csv(private / "quarantine.csv", keep_default_na=False)
    return code, quarantine, json.loads((tmp_path / "anon.json").read_text())


@pytest.mark.parametrize(("keyword", "key"), UID_CASES)
def test_anonymize_quarantines_files_whose_uid_is_not_a_uid(
    keyword, key, study, tiny_params, tmp_path, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, ANON_KEY)
    folder, _, _ = study(**{keyword: hostile(key, tmp_path)})
    n_bad = len(list((folder / "bad").iterdir()))
    code, quarantine, metrics = run_anonymize(folder, tmp_path, tiny_params)
    assert code == 0 and metrics["leaks_found"] == 0
    assert len(quarantine) == n_bad and quarantine["path"].str.startswith("bad/").all()
    assert set(quarantine["reason"]) == {"bad_uid"}
    assert quarantine["detail"].str.startswith(f"{keyword}: ").all()
    written = list((tmp_path / "anon" / "dicom").rglob("*.dcm"))
    assert metrics["files_out"] == len(written) == len(list((folder / "good").iterdir()))
    assert victim_intact(tmp_path)


@pytest.mark.parametrize("case", LUNA_CASES)
def test_anonymize_luna16_quarantines_names_and_data_files_that_leave_the_folder(
    case, tiny_params, tmp_path, write_tiny_cohort, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, ANON_KEY)
    source, uid = luna16_source(tmp_path, write_tiny_cohort)
    (source / "cohort.json").write_text('{"source": "luna16"}')
    name, data_file, _ = LUNA_CASES[case]
    if data_file == ABSOLUTE:
        data_file = str(tmp_path / "outside.raw")
    rel = plant_mhd(source, uid, name, data_file)
    code, quarantine, metrics = run_anonymize(source, tmp_path, tiny_params)
    assert code == 0 and list(quarantine["path"]) == [rel]
    expected = "bad_uid" if case.startswith("name") else ("not_dicom", "unsafe_path")
    assert quarantine["reason"][0] in expected, quarantine.to_dict("records")
    if case in ("data_dotdot", "data_slash", "data_absolute", "data_parent"):
        assert quarantine["reason"][0] == "unsafe_path"
    assert metrics["files_out"] == 1 and len(list((tmp_path / "anon" / "images").iterdir())) == 2


def test_anonymize_does_not_write_through_a_link_in_its_output(
    study, tiny_params, tmp_path, monkeypatch
):
    """A previous output whose ``dicom/`` is a symbolic link out: refused, nothing written there."""
    monkeypatch.setenv(KEY_ENV, ANON_KEY)
    folder, _, _ = study()
    hostile("absolute", tmp_path)
    (tmp_path / "anon").mkdir()
    (tmp_path / "anon" / "dicom").symlink_to(tmp_path / "victim")
    with pytest.raises(SystemExit, match="did not write, e.g. dicom"):
        run_anonymize(folder, tmp_path, tiny_params)
    assert victim_intact(tmp_path)


@pytest.mark.parametrize("key", ["dotdot", "dot", "slash", "absolute", "nul", "empty"])
def test_export_triton_folder_refuses_a_model_name_that_is_not_a_name(key, tmp_path):
    name = "" if key == "empty" else hostile(key, tmp_path)
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(UnsafePath, match="export.model_name"):
        build.add_triton(stage, name, 3)
    assert [p.name for p in stage.iterdir()] == ["model.onnx"] and victim_intact(tmp_path)


@pytest.mark.parametrize(
    ("out_dir", "model_name"),
    [("pkg/..", "seg"), (".", "seg"), ("pkg", ".."), ("pkg", "/")],
    ids=["out_dotdot", "out_dot", "name_dotdot", "name_slash"],
)
def test_export_refuses_a_bad_out_dir_or_model_name_before_building(
    out_dir, model_name, tmp_path, monkeypatch, tiny_params
):
    work = tmp_path / "work"
    (work / "pkg").mkdir(parents=True)
    (work / "sibling.txt").write_text("OUT_DIR's neighbour")
    monkeypatch.chdir(work)
    built = []

    def fake_build(inputs, stage, export, *rest):  # the package, minus the work
        built.append(stage)
        (stage / "model.onnx").write_bytes(b"x")
        build.add_triton(stage, export.model_name, 3)
        return {}

    monkeypatch.setattr(build, "build", fake_build)
    params = ctpipe_config.validate(tiny_params())
    # params.yaml's pattern refuses these names already: the package code refuses them again
    export = params.export.model_copy(update={"model_name": model_name})
    chosen = Chosen(threshold=0.5, component_threshold=0.5, shape_weight=0.0)
    inputs = build.Inputs(Path("m.pt"), Path("m.onnx"), Path("data"), Path("q"), chosen)
    with pytest.raises(UnsafePath):
        build.export_package(inputs, Path(out_dir), export, params.inference, 0)
    assert not built and sorted(p.name for p in work.iterdir()) == ["pkg", "sibling.txt"]
