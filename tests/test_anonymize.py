"""The anonymize stage end to end: a synthetic cohort full of PHI, pydicom's bundled series, the
LUNA16 layout, malformed inputs, the key rules, determinism, and the built-in leak verification."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from pydicom import dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import XRayRadiationDoseSRStorage

from ctpipe import synth
from ctpipe.deid import batch
from ctpipe.deid import stage as deid_stage
from ctpipe.deid.engine import Deidentifier
from ctpipe.deid.files import FileResult
from ctpipe.deid.keys import DEMO_KEY, KEY_ENV, Keyring
from ctpipe.deid.verify import Evidence, build_indexes
from ctpipe.fileio import write_csv, write_json
from stages import anonymize

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")
CFG = synth.Cohort(
    matrix=32,
    slice_spacing_mm=(2.5,),
    z_extent_mm=40,
    vessels_per_lung=1,
    fraction_without_nodules=0.0,
    max_nodules=2,
    diameter_mm=(5, 20),
)
SECTION = {
    "key_file": "",
    "retain_modified_dates": True,
    "retain_patient_characteristics": True,
    "clean_descriptors": True,
    "retain_device_identity": False,
    "retain_safe_private": False,
    "keep_linkage": False,
    "date_shift_days": [-3650, -365],
    "burned_in_missing_ok": ["CT", "MR", "PT", "NM", "RTDOSE", "SEG"],
}


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def params(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "params.yaml"
    full = yaml.safe_load((ROOT / "params.yaml").read_text())
    full["base"].update(seed=42, workers=overrides.pop("workers", 1))
    full["anonymize"] = {**full["anonymize"], **SECTION, **overrides}
    path.write_text(yaml.safe_dump(full))
    return path


def stage(inputs: Path, tmp_path: Path, name: str = "out", **overrides) -> tuple[int, Path, dict]:
    out = tmp_path / name
    metrics = tmp_path / f"{name}_metrics.json"
    code = anonymize.main(
        [
            str(inputs),
            str(out),
            "--private-dir",
            str(tmp_path / f"{name}_private"),
            "--params",
            str(params(tmp_path, **overrides)),
            "--metrics",
            str(metrics),
        ]
    )
    return code, out, json.loads(metrics.read_text()) if metrics.is_file() else {}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """data/raw as ingest writes it: dicom/ (folders named after the patients), CSV, cohort.json."""
    raw = tmp_path_factory.mktemp("raw")
    rows = []
    for index in range(2):
        rows += synth.write_case(raw / "dicom", 42, index, CFG)
    write_csv(raw / "annotations.csv", synth.annotations_frame(rows))
    write_json(raw / "cohort.json", {"source": "synthetic"})
    return raw


def phi_of(raw: Path) -> set[str]:
    """The identity the synthetic files carry, gathered independently of the stage."""
    phi = set()
    for path in (raw / "dicom").rglob("*.dcm"):
        ds = dcmread(path)
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientAddress",
            "InstitutionName",
            "InstitutionAddress",
            "ReferringPhysicianName",
            "PerformingPhysicianName",
            "OperatorsName",
            "AccessionNumber",
            "StudyDate",
            "DeviceSerialNumber",
            "StationName",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "FrameOfReferenceUID",
        ):
            value = str(ds.get(keyword, ""))
            phi.add(value)
            phi.update(re.split(r"[\^ ,]+", value))
        phi.add(ds.OtherPatientIDsSequence[0].PatientID)
        phi.add(path.parent.name)
    return {
        p.lower() for p in phi if len(p) >= 4 and p.lower() not in ("hospital", "street", "road")
    }


def series_images(root: Path) -> dict[str, sitk.Image]:
    """SimpleITK's reading of every series under root, by SeriesInstanceUID."""
    images = {}
    for folder in sorted({p.parent for p in root.rglob("*") if p.is_file()}):
        for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))
            images[sid] = reader.Execute()
    return images


def assert_same_image(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetSpacing(), b.GetSpacing())
    assert np.allclose(a.GetDirection(), b.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_synthetic_cohort(cohort: Path, tmp_path: Path):
    code, out, metrics = stage(cohort, tmp_path, workers=2)
    assert code == 0
    n_in = len(list((cohort / "dicom").rglob("*.dcm")))
    assert metrics["files_in"] == metrics["files_out"] == n_in and metrics["files_quarantined"] == 0
    assert metrics["series_out"] == metrics["patients_out"] == 2 and metrics["leaks_found"] == 0
    assert set(metrics) >= {"seconds", "files_per_s"}
    files = sorted((out / "dicom").rglob("*.dcm"))
    for path in files[:5]:
        ds = dcmread(path)
        assert path.relative_to(out / "dicom").parts == (
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID + ".dcm",
        )
    # no PHI in any pushable byte or name (times are kept: whole-day date shifts)
    phi = phi_of(cohort)
    for path in [p for p in out.rglob("*") if p.is_file()]:
        data, name = path.read_bytes().lower(), str(path.relative_to(out)).lower()
        assert not [p for p in phi if p.encode() in data or p in name], path
    # annotations remapped with the same keyed UIDs
    before, after = pd.read_csv(cohort / "annotations.csv"), pd.read_csv(out / "annotations.csv")
    keyring = Keyring(DEMO_KEY)
    assert list(after["seriesuid"]) == [keyring.uid(u) for u in before["seriesuid"]]
    assert np.allclose(
        after[["coordX", "coordY", "coordZ", "diameter_mm"]],
        before[["coordX", "coordY", "coordZ", "diameter_mm"]],
    )
    assert set(after["seriesuid"]) == {p.name for p in (out / "dicom").glob("*/*")}
    # images read the same, geometry and voxels
    raw_images, new_images = series_images(cohort / "dicom"), series_images(out / "dicom")
    for uid, image in raw_images.items():
        assert_same_image(image, new_images[keyring.uid(uid)])
    # audit, quarantine, options
    audit = pd.read_csv(out / "audit.csv")
    assert (
        len(audit) == n_in and (audit["n_U"] >= 4).all() and (audit["n_private_removed"] == 3).all()
    )
    assert audit["options"].iloc[0] == "113100;113105;113107;113108"
    assert "00100010=Z" in audit["actions"].iloc[0]
    assert pd.read_csv(out / "quarantine.csv").empty
    options = json.loads((out / "deid_options.json").read_text())
    assert options["key_source"] == "demo" and options["codes"][0] == "113100"
    assert options["table"]["rows"] >= 600 and DEMO_KEY.decode() not in json.dumps(options)


def test_same_key_same_bytes_other_key_other_uids(cohort: Path, tmp_path: Path, monkeypatch):
    assert stage(cohort, tmp_path, "a")[0] == 0 and stage(cohort, tmp_path, "b", workers=2)[0] == 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    monkeypatch.setenv(KEY_ENV, "another-secret-key-for-this-test")
    code, other, _ = stage(cohort, tmp_path, "c")
    assert code == 0
    names = {p.name for p in (tmp_path / "a" / "dicom").rglob("*")}
    assert not names & {p.name for p in (other / "dicom").rglob("*")}
    assert json.loads((other / "deid_options.json").read_text())["key_source"] == "env"


def test_real_cohort_needs_a_key(tmp_path: Path, monkeypatch):
    plain = (
        tmp_path / "plain"
    )  # no dicom/, no cohort.json: any folder of DICOM files, a real cohort
    synth.write_study(synth.make_case(1, 0, CFG.but(z_extent_mm=10)), plain, 1)
    code, out, _ = stage(plain, tmp_path, key_file=str(tmp_path / "missing.key"))
    assert code == 2 and not out.exists()
    key_file = tmp_path / "keys" / "deid.key"
    key_file.parent.mkdir()
    key_file.write_text("a-long-enough-secret-for-tests-0123456789\n")
    code, out, metrics = stage(plain, tmp_path, key_file=str(key_file))
    assert code == 0 and metrics["files_out"] == 4
    assert json.loads((out / "deid_options.json").read_text())["key_source"] == "file"
    inside = plain / "deid.key"  # a key inside a folder the stage reads or writes is refused
    inside.write_text("a-long-enough-secret-for-tests-0123456789\n")
    assert stage(plain, tmp_path, "again", key_file=str(inside))[0] == 2


@pytest.mark.parametrize(
    "key", ["hospital-2024", "correct horse battery staple and more words", "a" * 40, "abab" * 10]
)
def test_a_typed_key_is_refused(key, tmp_path: Path):
    """Short keys, passphrases and repetitive keys are guessable: refused for a real cohort."""
    plain = tmp_path / "plain"
    synth.write_study(synth.make_case(1, 0, CFG.but(z_extent_mm=10)), plain, 1)
    key_file = tmp_path / "keys" / "deid.key"
    key_file.parent.mkdir()
    key_file.write_text(key + "\n")
    code, out, _ = stage(plain, tmp_path, key_file=str(key_file))
    assert code == 2 and not out.exists()


def test_nothing_public_is_derived_from_the_key_alone(tmp_path: Path, monkeypatch):
    """The key's fingerprint (HMAC of a constant) would let anyone test guesses offline: it is
    written to the private folder, never to the pushable output."""
    key = "0123456789abcdef" * 4
    monkeypatch.setenv(KEY_ENV, key)
    plain = tmp_path / "plain"
    synth.write_study(synth.make_case(1, 0, CFG.but(z_extent_mm=10)), plain, 1)
    code, out, _ = stage(plain, tmp_path)
    assert code == 0
    fingerprint = Keyring(key.encode()).fingerprint()
    public = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert fingerprint.encode() not in public
    private = json.loads((out.with_name(out.name + "_private") / "deid_key.json").read_text())
    assert private == {"key_fingerprint": fingerprint, "key_source": "env"}


def test_malformed_and_risky_inputs_are_quarantined(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "pytest-secret-key-0123456789-abcdefXYZ")
    raw = tmp_path / "mixed"
    _, files = synth.write_study(synth.make_case(5, 0, CFG.but(z_extent_mm=20)), raw, 5)
    expected = {}
    (raw / "notes DOE John.txt").write_text("Patient DOE^JOHN, MRN 1234567")
    expected["notes DOE John.txt"] = "not_dicom"
    data = files[1].read_bytes()
    (raw / "truncated.dcm").write_bytes(data[: len(data) - 700])
    expected["truncated.dcm"] = "truncated"
    ds = dcmread(files[2])
    ds.save_as(raw / "no_meta.dcm", enforce_file_format=False)
    ds.file_meta = type(ds.file_meta)()
    ds.preamble = None
    ds.save_as(raw / "no_meta.dcm", enforce_file_format=False)
    expected["no_meta.dcm"] = "missing_meta"
    bad = data.replace(b"\x10\x00\x10\x00PN", b"\x10\x00\x10\x00ZZ", 1)
    (raw / "bad_vr.dcm").write_bytes(bad)
    expected["bad_vr.dcm"] = "bad_vr"
    shutil.copy(get_testdata_file("DICOMDIR"), raw / "DICOMDIR")
    expected["DICOMDIR"] = "dicomdir"
    # stray tables from another tool in a plain folder: inputs like any other, reported
    (raw / "cohort.json").write_text("{not json")
    (raw / "annotations.csv").write_text("id,x\n1,2\n")
    expected["cohort.json"] = expected["annotations.csv"] = "not_dicom"
    # entries that are no regular file: listed, not lost
    (raw / "loop").symlink_to(raw)
    (raw / "dangling.dcm").symlink_to(raw / "missing.dcm")
    os.mkfifo(raw / "fifo.dcm")
    (raw / os.fsdecode(b"caf\xe9.dcm")).write_bytes(files[0].read_bytes())
    for name in ("loop", "dangling.dcm", "fifo.dcm", "caf\\xe9.dcm"):
        expected[name] = "unusable"
    for name, change, reason in [
        ("sc.dcm", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "secondary_capture"),
        ("screen.dcm", {"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, "screen_save"),
        ("dose.dcm", {"SOPClassUID": XRayRadiationDoseSRStorage}, "dose_report"),
        ("burned.dcm", {"BurnedInAnnotation": "YES"}, "burned_in_annotation"),
        ("us.dcm", {"Modality": "US", "BurnedInAnnotation": None}, "burned_in_annotation"),
    ]:
        ds = dcmread(files[3])
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".9" + str(len(expected))
        for keyword, value in change.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.save_as(raw / name, enforce_file_format=True)
        expected[name] = reason
    code, out, metrics = stage(raw, tmp_path)
    assert code == 0 and metrics["leaks_found"] == 0
    private = pd.read_csv(tmp_path / "out_private" / "quarantine.csv")
    assert dict(zip(private["path"], private["reason"])) == expected
    public = pd.read_csv(out / "quarantine.csv")
    assert sorted(public["reason"]) == sorted(expected.values())
    assert "doe" not in (out / "quarantine.csv").read_text().lower()
    assert metrics["files_out"] == len(files) == len(list((out / "dicom").rglob("*.dcm")))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"annotations.csv": "id,x\n1,2\n"}, "missing columns ['seriesuid'"),
        ({"annotations.csv": b"\xff\xfe\x00bad"}, "annotations.csv: unreadable CSV"),
        ({"cohort.json": '{"source": "pacs"}'}, "source 'pacs' is not one of"),
        ({"cohort.json": "{not json"}, "source 'unreadable (JSONDecodeError)'"),
        ({"dicom": None}, "no input files"),
    ],
)
@pytest.mark.parametrize("workers", [1, 2])  # 2: annotations.csv is read by the other worker
def test_a_broken_cohort_folder_stops_with_the_file_and_the_reason(
    change, message, workers, cohort: Path, tmp_path: Path, caplog
):
    raw = tmp_path / "raw"
    shutil.copytree(cohort, raw)
    for name, content in change.items():
        if content is None:
            shutil.rmtree(raw / name)
            (raw / name).mkdir()
        elif isinstance(content, bytes):
            (raw / name).write_bytes(content)
        else:
            (raw / name).write_text(content)
    code, out, _ = stage(raw, tmp_path, workers=workers)
    assert code == 2 and message in caplog.text
    assert not (out / "dicom").exists() or not list((out / "dicom").rglob("*.dcm"))


def test_a_surviving_value_fails_the_stage(cohort: Path, tmp_path: Path, monkeypatch):
    """Break the profile (keep Patient's Name): the verification must catch it and clean up."""
    original = Deidentifier.deidentify

    def leaky(self, ds):
        name = ds.PatientName
        state = original(self, ds)
        ds.ImageComments = f"seen by {name}"  # a leak the table knows nothing about
        return state

    monkeypatch.setattr(Deidentifier, "deidentify", leaky)
    code, out, metrics = stage(cohort, tmp_path)
    assert code == 1 and metrics["leaks_found"] > 0
    leaks = pd.read_csv(tmp_path / "out_private" / "leaks.csv")
    assert len(leaks) and not list((out / "dicom").rglob("*.dcm"))


@pytest.fixture
def free_text_cohort(cohort: Path, tmp_path: Path) -> tuple[Path, list[str], list[str]]:
    """The cohort with names in free text that no header of the file holds: a doctor nobody
    lists, the *other* patient of the run, a PN-formatted name, a phone number, an e-mail."""
    raw = tmp_path / "raw"
    shutil.copytree(cohort, raw)
    folders = sorted(p for p in (raw / "dicom").iterdir() if p.is_dir())
    other = dcmread(next(folders[1].rglob("*.dcm"))).PatientName
    path = sorted(folders[0].rglob("*.dcm"))[0]
    ds = dcmread(path)
    ds.ImageComments = "seen by Dr Fenwick Oddsworth on ward 7"
    ds.PatientComments = f"compare with {other.given_name} {other.family_name}"
    ds.SeriesDescription = (
        f"Lung 1.0 B60f DR. FENWICK ODDSWORTH {other.given_name.title()} "
        f"{other.family_name.title()} QUINCE^MARGARETTA +44 20 7946 0958 f.odd@example.org"
    )
    ds.save_as(path)
    planted = ["fenwick", "oddsworth", "quince", "margaretta", "7946", "example.org"]
    return raw, planted + [other.given_name.lower(), other.family_name.lower()], [path.name]


def test_free_text_cannot_leak_names_no_header_holds(free_text_cohort, tmp_path: Path):
    raw, planted, _ = free_text_cohort
    code, out, metrics = stage(raw, tmp_path)
    assert code == 0 and metrics["leaks_found"] == 0
    descriptions = set()
    for path in (out / "dicom").rglob("*.dcm"):
        data = path.read_bytes().lower()
        assert not [p for p in planted if p.encode() in data], path
        ds = dcmread(path)
        assert "ImageComments" not in ds and "PatientComments" not in ds
        descriptions.add(ds.SeriesDescription)
    assert descriptions == {"Lung 1.0 B60f"}  # the allow-listed descriptor kept, scrubbed


def assert_same_indexes(got: tuple, want: tuple) -> None:
    (per_patient, cross), (want_patients, want_cross) = got, want
    assert per_patient.keys() == want_patients.keys()
    for patient, index in [*per_patient.items(), ("<cross>", cross)]:
        other = want_patients.get(patient, want_cross)
        assert (index.text, index.exact) == (other.text, other.exact), patient


@pytest.mark.parametrize("workers", [1, 2])
def test_the_gate_looks_for_the_values_of_the_final_files(
    workers, free_text_cohort, tmp_path: Path, monkeypatch
):
    """The gate's indexes are built while the file with the cohort's names is de-identified
    again: they must be those of the files as finally written."""
    raw, _, _ = free_text_cohort
    seen = []
    deidentify = deid_stage.deidentify
    monkeypatch.setattr(
        deid_stage, "deidentify", lambda *a: seen.append(deidentify(*a)) or seen[-1]
    )
    assert stage(raw, tmp_path, workers=workers)[0] == 0
    results, indexes, _, _ = seen[0]
    want = build_indexes(deid_stage.merged(results, {}), batch.LEAK_MIN_CHARS)
    assert_same_indexes(indexes, want)


@pytest.mark.parametrize(
    ("first", "final"),
    [  # a kept descriptor held a name only another file revealed: scrubbed the second time
        (
            {"ident": {"quince margaretta"}, "kept": {"lung quince margaretta"}},
            {"ident": {"quince margaretta"}, "cleaned": {"lung quince margaretta"}},
        ),
        (  # only what was cleaned changed: that patient's index alone is made again
            {"weak": {"ward seven"}, "cleaned": {"seen on ward seven"}},
            {"weak": {"ward seven"}, "cleaned": {"seen on ward"}},
        ),
    ],
)
def test_indexes_follow_the_evidence_the_second_pass_changed(first, final, monkeypatch):
    """The gate must look for the values of the files as finally written."""

    def results(evidence: dict) -> list[FileResult]:
        out_rel = "dicom/1/2/3.dcm"
        other = FileResult(
            rel="b.dcm", out_rel=out_rel, patient="q", evidence=Evidence(ident={"oddsworth"})
        )
        return [
            FileResult(rel="a.dcm", out_rel=out_rel, patient="p", evidence=Evidence(**evidence)),
            other,
        ]

    first_results, final_results = results(first), results(final)
    monkeypatch.setattr(
        batch, "deidentify", lambda *a: (first_results, frozenset(), lambda: final_results)
    )
    got, indexes, _, _ = deid_stage.deidentify([], None, None, "synthetic", Path("."), None)
    assert got == final_results
    want = build_indexes(deid_stage.merged(final_results, {}), batch.LEAK_MIN_CHARS)
    assert_same_indexes(indexes, want)
    stale = build_indexes(deid_stage.merged(first_results, {}), batch.LEAK_MIN_CHARS)
    assert stale[0]["p"].text != want[0]["p"].text  # the first pass's would have missed it


def test_the_gate_finds_free_text_patterns_not_only_known_values(
    free_text_cohort, tmp_path: Path, monkeypatch
):
    """With the pattern scrubber broken, the phone number and the e-mail address survive: the
    leak gate must find them by pattern (neither is in any header), and delete the file."""
    raw, _, _ = free_text_cohort
    monkeypatch.setattr("ctpipe.deid.freetext.pattern_spans", lambda value: [])
    code, out, metrics = stage(raw, tmp_path)
    assert code == 1 and metrics["leaks_found"] >= 2
    leaks = pd.read_csv(tmp_path / "out_private" / "leaks.csv")
    findings = " ".join(leaks["finding"])
    assert "phone number '+44 20 7946 0958'" in findings
    assert "e-mail address 'f.odd@example.org'" in findings
    (leaking,) = set(leaks["file"])
    assert not (out / leaking).exists() and len(list((out / "dicom").rglob("*.dcm"))) > 1


def test_keep_linkage_goes_to_the_private_folder_only(cohort: Path, tmp_path: Path):
    code, out, _ = stage(cohort, tmp_path, keep_linkage=True)
    assert code == 0
    linkage = pd.read_csv(tmp_path / "out_private" / "linkage.csv", dtype=str)
    first = dcmread(min((cohort / "dicom").rglob("*.dcm")))
    row = linkage[(linkage["kind"] == "patient_id") & (linkage["original"] == first.PatientID)]
    assert row["pseudonym"].iloc[0] == Keyring(DEMO_KEY).patient_id("id:" + first.PatientID)
    assert not (out / "linkage.csv").exists()


def test_pydicom_series_keep_their_geometry(tmp_path: Path, monkeypatch):
    """The multi-file series that ship with pydicom (CT and MR): SimpleITK reads them the same."""
    monkeypatch.setenv(KEY_ENV, "pytest-secret-key-0123456789-abcdefXYZ")
    raw = tmp_path / "series"
    for path in map(Path, get_testdata_files()):
        if path.parent.name in ("CT2", "CT2N", "CT5N", "MR1", "MR2", "MR700") and path.is_file():
            target = raw / dcmread(path).SeriesInstanceUID / path.name  # one folder per series
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    code, out, metrics = stage(raw, tmp_path)
    assert code == 0 and metrics["files_quarantined"] == 0 and metrics["leaks_found"] == 0
    keyring = Keyring(b"pytest-secret-key-0123456789-abcdefXYZ")
    before, after = series_images(raw), series_images(out / "dicom")
    assert len(before) >= 8
    for folder in raw.iterdir():
        files = sorted(folder.iterdir())
        news = [
            out
            / "dicom"
            / keyring.uid(dcmread(f).StudyInstanceUID)
            / keyring.uid(folder.name)
            / (keyring.uid(dcmread(f).SOPInstanceUID) + ".dcm")
            for f in files
        ]
        for old, new in zip(files, news):  # every slice, as an image of its own
            assert_same_image(sitk.ReadImage(str(old)), sitk.ReadImage(str(new)))
        if len({tuple(dcmread(f).ImageOrientationPatient) for f in files}) == 1:
            # a volume (not a multi-orientation scout, whose reading depends on file order)
            assert_same_image(before[folder.name], after[keyring.uid(folder.name)])


def test_luna16_images_are_renamed_and_annotations_remapped(tmp_path: Path, monkeypatch):
    raw = tmp_path / "luna"
    (raw / "images").mkdir(parents=True)
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetOrigin((-10.0, 20.0, -300.5))
    image.SetSpacing((0.7, 0.7, 2.5))
    sitk.WriteImage(image, str(raw / "images" / f"{uid}.mhd"))
    with open(raw / "images" / f"{uid}.mhd", "a") as f:
        f.write("PatientName = DOE^JANE\n")  # a header key no MetaImage reader needs
    write_csv(
        raw / "annotations.csv",
        pd.DataFrame(
            [
                {
                    "seriesuid": uid,
                    "coordX": -9.0,
                    "coordY": 21.0,
                    "coordZ": -298.0,
                    "diameter_mm": 5.0,
                }
            ]
        ),
    )
    write_json(raw / "cohort.json", {"source": "luna16"})
    assert stage(raw, tmp_path, "refused")[0] == 2  # a real cohort: no demo key
    monkeypatch.setenv(KEY_ENV, "pytest-secret-key-0123456789-abcdefXYZ")
    code, out, metrics = stage(raw, tmp_path)
    assert code == 0 and metrics["leaks_found"] == 0
    new = Keyring(b"pytest-secret-key-0123456789-abcdefXYZ").uid(uid)
    header = (out / "images" / f"{new}.mhd").read_text()
    assert f"ElementDataFile = {new}.raw" in header and uid not in header and "DOE" not in header
    assert_same_image(image, sitk.ReadImage(str(out / "images" / f"{new}.mhd")))
    assert list(pd.read_csv(out / "annotations.csv")["seriesuid"]) == [new]
