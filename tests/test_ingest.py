"""Ingest accounts for every input file: bad ones are listed with a reason, the rest go through."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pydicom
import yaml

from ctpipe import dicomio, synth
from stages import ingest, preprocess


def make_messy_folder(root: Path, write_tiny_cohort) -> dict[str, str]:
    """Three good studies plus one of each defect; returns {path: expected reason fragment}."""
    rows = write_tiny_cohort(root, n=5)
    synth.annotations_frame(rows).to_csv(root / "annotations.csv", index=False)
    studies = sorted(p for p in root.iterdir() if p.is_dir())
    expected = {}
    (root / "notes.txt").write_text("not an image")
    expected["notes.txt"] = "not a DICOM file"
    # Truncated file: cut in the middle of its pixel data.
    victim = sorted(studies[0].glob("*.dcm"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    expected[str(victim.relative_to(root))] = "truncated"
    # Missing slice: the whole series is rejected, naming the gap.
    gone = sorted(studies[1].glob("*.dcm"))[10]
    gone.unlink()
    for f in studies[1].glob("*.dcm"):
        expected[str(f.relative_to(root))] = "missing slice"
    # Non-CT series: relabel a whole study as MR.
    for f in studies[2].glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
        expected[str(f.relative_to(root))] = "modality MR"
    # Duplicate slice: a copy of one slice under another name; the series still goes through.
    dup_src = sorted(studies[3].glob("*.dcm"))[5]
    shutil.copy(dup_src, studies[3] / "ZZ_copy.dcm")
    expected[str((studies[3] / "ZZ_copy.dcm").relative_to(root))] = "duplicate slice"
    return expected


def test_every_file_in_manifest_with_reason(tmp_path, write_tiny_cohort):
    src = tmp_path / "src"
    expected = make_messy_folder(src, write_tiny_cohort)
    manifest = dicomio.scan_folder(src, workers=1, min_slices=8)
    all_files = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()}
    assert set(manifest["path"]) == all_files
    by_path = manifest.set_index("path")
    for path, fragment in expected.items():
        assert by_path.loc[path, "status"] == "skipped", path
        assert fragment in by_path.loc[path, "reason"], (path, by_path.loc[path, "reason"])
    ok = manifest[manifest["status"] == "ok"]
    # Studies 3 and 4 survive (study 0 loses only its truncated slice: the gap rejects it too).
    assert ok["series_uid"].nunique() >= 2
    assert (manifest["status"] == "ok").sum() + len(expected) <= len(manifest)


def test_ingest_stage_on_user_folder(tmp_path, params_file, write_tiny_cohort):
    src = tmp_path / "src"
    expected = make_messy_folder(src, write_tiny_cohort)
    params = yaml.safe_load(params_file.read_text())
    params["ingest"].update(
        source="dicom", source_dir=str(src), annotations=str(src / "annotations.csv")
    )
    params_file.write_text(yaml.safe_dump(params))
    out, metrics = tmp_path / "raw", tmp_path / "ingest.json"
    assert ingest.main([str(out), "--params", str(params_file), "--metrics", str(metrics)]) == 0
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert len(manifest) == sum(1 for p in src.rglob("*") if p.is_file())
    assert manifest.set_index("path").loc["annotations.csv", "status"] == "annotations"
    copied = {str(p.relative_to(out / "dicom")) for p in (out / "dicom").rglob("*.dcm")}
    assert copied == set(manifest.loc[manifest["status"] == "ok", "path"])
    assert not copied & set(expected)
    # Stored once: each accepted file is a link to its input (tmp_path is one file system).
    for rel in copied:
        assert (out / "dicom" / rel).stat().st_ino == (src / rel).stat().st_ino, rel
    assert (out / "annotations.csv").is_file() and (out / "cohort.json").is_file()
    # The good series go on through preprocess (its layout is what anonymize also writes).
    assert (
        preprocess.main(
            [
                str(out),
                str(tmp_path / "processed"),
                "--params",
                str(params_file),
                "--metrics",
                str(tmp_path / "pre.json"),
            ]
        )
        == 0
    )
    cases = json.loads((tmp_path / "processed" / "index.json").read_text())["cases"]
    good = set(manifest.loc[manifest["status"] == "ok", "series_uid"])
    assert {c["seriesuid"] for c in cases} == good and len(good) >= 2


def test_slices_sorted_by_position_not_name_or_instance_number(
    tmp_path, write_tiny_cohort, scramble_slice_order, tiny_synth
):
    """File names and InstanceNumbers in random orders must not reorder the volume."""
    write_tiny_cohort(tmp_path / "a", n=1)
    study = next((tmp_path / "a").iterdir())
    by_position = scramble_slice_order(study)
    manifest = dicomio.scan_folder(tmp_path / "a", workers=1)
    ((uid, paths),) = dicomio.series_files(manifest).items()
    assert [tmp_path / "a" / p for p in paths] == by_position
    volume, geom = dicomio.read_series([tmp_path / "a" / p for p in sorted(paths)])
    case = synth.make_case(7, 0, tiny_synth)
    assert volume.shape == case.hu.shape
    assert abs(volume - case.hu).max() <= 1.0  # stored as integers: rounding only
    assert abs(geom.origin - case.geometry.origin).max() < 1e-3
    assert abs(geom.spacing - case.geometry.spacing).max() < 1e-4


def test_where_a_link_is_refused_ingest_copies(tmp_path, monkeypatch):
    """Another file system (EXDEV) or links not allowed: the accepted file is copied instead."""
    src, dest = tmp_path / "a.dcm", tmp_path / "out" / "a.dcm"
    src.write_bytes(b"DICM" * 100)
    dest.parent.mkdir()

    def refuse(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(ingest.os, "link", refuse)
    ingest.link_or_copy(src, dest)
    assert dest.read_bytes() == src.read_bytes()
    assert dest.stat().st_ino != src.stat().st_ino
