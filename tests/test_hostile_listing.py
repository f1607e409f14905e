"""Listing an input folder never crashes and drops nothing (the issue: two symbolic links pointing
at each other made ingest stop with a traceback and the whole cohort fail). Each hostile entry is
planted next to a valid series and given to every entry point that lists input folders: the DICOM
scan (``ctpipe.dicomio``, which predict, preprocess and serve use), ingest, anonymize and predict.
Each entry must come back as a row with its reason, and the valid series must go through."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

from ctpipe import dicomio, listing, synth
from ctpipe.deid import cohort
from ctpipe.deid.keys import KEY_ENV
from ctpipe.deploy import predict
from ctpipe.fileio import read_json
from stages import anonymize, ingest

pytestmark = pytest.mark.usefixtures("escape_guard")

# kind -> (paths the rows must have, relative to the input folder; what the reason must say)
KINDS = {
    "loop2": (["a.dcm", "b.dcm"], "symbolic link loop"),
    "loop3": (["x.dcm", "y.dcm", "z.dcm"], "symbolic link loop"),
    "link_to_own_folder": (["sub/here", "sub/up"], "symbolic link to a folder: not followed"),
    "link_out": (["outside.dcm"], "symbolic link to a file outside the input folder"),
    "unreadable_file": (["locked.dcm"], "permission denied"),
    "unreadable_folder": (["locked"], "permission denied"),
    "not_utf8": (["caf\\xe9.dcm"], "file name is not valid utf-8"),
    "vanished": (["gone.dcm"], "no such file or directory"),
}


@pytest.fixture
def hostile_folder(tmp_path, write_tiny_cohort):
    """``hostile_folder(*kinds)``: ``tmp_path/src`` holding a valid series (``good/``) and the
    entries of each kind (a slice of another series where it is a file); returns the folder, the
    valid series UID and the annotation rows."""

    def make(*kinds: str) -> tuple[Path, str, list[dict]]:
        rows = write_tiny_cohort(tmp_path / "gen", n=1, seed=21)
        (gen,) = list((tmp_path / "gen").iterdir())
        src = tmp_path / "src"
        (src / "good").mkdir(parents=True)
        for f in gen.glob("*.dcm"):
            (src / "good" / f.name).write_bytes(f.read_bytes())
        uid = pydicom.dcmread(next(gen.glob("*.dcm"))).SeriesInstanceUID
        other = pydicom.dcmread(next(gen.glob("*.dcm")))
        other.SeriesInstanceUID = other.SOPInstanceUID = pydicom.uid.generate_uid()
        other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
        for kind in kinds:
            plant(kind, src, other, tmp_path)
        return src, uid, rows

    return make


def plant(kind: str, src: Path, other: pydicom.Dataset, tmp_path: Path) -> None:
    """The entries of ``kind`` (``KINDS``) under ``src``; ``other`` is the slice files hold."""
    if kind == "loop2":
        os.symlink("b.dcm", src / "a.dcm")
        os.symlink("a.dcm", src / "b.dcm")
    elif kind == "loop3":
        for name, target in (("x", "y"), ("y", "z"), ("z", "x")):
            os.symlink(f"{target}.dcm", src / f"{name}.dcm")
    elif kind == "link_to_own_folder":
        (src / "sub").mkdir()
        os.symlink(".", src / "sub" / "here")  # the folder the link is in
        os.symlink("..", src / "sub" / "up")  # the input folder itself
    elif kind == "link_out":
        (tmp_path / "elsewhere").mkdir()
        other.save_as(tmp_path / "elsewhere" / "slice.dcm")
        os.symlink(tmp_path / "elsewhere" / "slice.dcm", src / "outside.dcm")
    elif kind == "unreadable_file":
        other.save_as(src / "locked.dcm")
    elif kind == "unreadable_folder":
        (src / "locked").mkdir()
        other.save_as(src / "locked" / "slice.dcm")
    elif kind == "not_utf8":
        other.save_as(src / os.fsdecode(b"caf\xe9.dcm"))
    elif kind == "vanished":
        other.save_as(src / "gone.dcm")


@pytest.fixture
def hazards(unreadable, monkeypatch):
    """``with hazards(src, module, name, *kinds):`` the unreadable entries denied meanwhile; for
    ``vanished``, ``module.name`` (a listing or scanning function) wrapped so that
    ``src/gone.dcm`` is deleted right after it returns: gone before it is read or copied."""

    @contextlib.contextmanager
    def active(src: Path, module, name: str, *kinds: str):
        if "vanished" in kinds:
            real = getattr(module, name)

            def then_delete(*args, **kwargs):
                result = real(*args, **kwargs)
                (src / "gone.dcm").unlink()
                return result

            monkeypatch.setattr(module, name, then_delete)
        locked = {"unreadable_file": src / "locked.dcm", "unreadable_folder": src / "locked"}
        with unreadable(*[path for kind, path in locked.items() if kind in kinds]):
            yield

    return active


def check_rows(rows: dict[str, str], *kinds: str) -> None:
    """Every path of each kind has a row whose reason says what ``KINDS`` says (any case)."""
    for kind in kinds:
        paths, reason = KINDS[kind]
        for path in paths:
            assert path in rows, f"{path}: no row with a reason (dropped or read); rows: {rows}"
            assert reason in rows[path].lower(), (path, rows[path])


@pytest.mark.parametrize("kind", KINDS)
def test_dicom_scan_lists_every_hostile_entry_with_its_reason(kind, hostile_folder, hazards):
    src, uid, _ = hostile_folder(kind)
    with hazards(src, dicomio, "list_files", kind):
        manifest = dicomio.scan_folder(src)
    skipped = manifest[manifest["status"] != "ok"]
    check_rows(dict(zip(skipped["path"], skipped["reason"])), kind)
    accepted = dicomio.series_files(manifest)
    assert list(accepted) == [uid] and len(accepted[uid]) == len(list((src / "good").iterdir()))


@pytest.mark.parametrize("kind", KINDS)
def test_ingest_lists_every_hostile_entry_and_copies_the_rest(
    kind, hostile_folder, hazards, tiny_params, tmp_path
):
    src, uid, rows = hostile_folder(kind)
    synth.annotations_frame(rows).to_csv(tmp_path / "annotations.csv", index=False)
    params = tiny_params()
    params["ingest"].update(  # min_slices 1: a lone slice (gone.dcm) is accepted, then copied
        source="dicom",
        source_dir=str(src),
        annotations=str(tmp_path / "annotations.csv"),
        min_slices=1,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = [str(tmp_path / "raw"), "--params", str(tmp_path / "params.yaml")]
    with hazards(src, dicomio, "scan_folder", kind):  # vanished: after the scan, before the copy
        assert ingest.main(argv + ["--metrics", str(tmp_path / "ingest.json")]) == 0
    manifest = pd.read_csv(tmp_path / "raw" / "manifest.csv", keep_default_na=False)
    skipped = manifest[manifest["status"] != "ok"]
    check_rows(dict(zip(skipped["path"], skipped["reason"])), kind)
    ok = manifest[manifest["status"] == "ok"]
    assert set(ok["series_uid"]) == {uid} and len(ok) == len(list((src / "good").iterdir()))
    copied = {str(p.relative_to(tmp_path / "raw" / "dicom")) for p in tmp_path.glob("raw/**/*.dcm")}
    assert copied == set(ok["path"])


@pytest.mark.parametrize("kind", KINDS)
def test_anonymize_quarantines_every_hostile_entry_and_writes_the_rest(
    kind, hostile_folder, hazards, tiny_params, tmp_path, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "pytest-secret-key-0123456789-abcdefXYZ")
    src, _, _ = hostile_folder(kind)
    params = tiny_params()
    params["anonymize"].update(key_file="")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, private = tmp_path / "out", tmp_path / "private"
    argv = [str(src), str(out), "--private-dir", str(private), "--params"]
    argv += [str(tmp_path / "params.yaml"), "--metrics", str(tmp_path / "anonymize.json")]
    with hazards(src, cohort, "list_files", kind):
        assert anonymize.main(argv) == 0
    quarantine = pd.read_csv(private / "quarantine.csv", keep_default_na=False)
    assert set(quarantine["reason"]) <= {"unusable", "unreadable"}, quarantine.to_dict("records")
    check_rows(dict(zip(quarantine["path"], quarantine["detail"])), kind)
    written = list((out / "dicom").rglob("*.dcm"))
    assert len(written) == len(list((src / "good").iterdir()))


def test_predict_accounts_for_every_hostile_entry(hostile_folder, hazards, tiny_package, tmp_path):
    """Every kind in one study folder: the valid series is predicted, every entry is listed."""
    src, uid, _ = hostile_folder(*KINDS)
    out = tmp_path / "out"
    with hazards(src, dicomio, "list_files", *KINDS):
        assert predict.main([str(src), str(out), "--package", str(tiny_package)]) == 0
    summary = read_json(out / "summary.json")
    assert summary["predicted"] == 1 and summary["series"][uid]["status"] == "predicted"
    check_rows({f["path"]: f["reason"] for f in summary["unused_files"]}, *KINDS)


def test_files_come_in_path_order_with_their_relative_paths(tmp_path: Path, monkeypatch):
    """Listed as text for speed, the files keep Path's order (part by part: ``a/b`` before
    ``a-c``, which plain text would put first), and relative paths are as ``relative_to``'s."""
    names = ["a/b", "a-c", "a.d", "a/b-c/d", "a/c/e", "B", "é/f"]
    for name in names:
        (tmp_path / "dicom" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dicom" / name).write_bytes(b"x")
    paths, skipped = listing.list_files(tmp_path / "dicom")
    assert not skipped
    assert paths == sorted(paths) and [str(p) for p in paths] != sorted(str(p) for p in paths)
    monkeypatch.chdir(tmp_path)
    for folder in (tmp_path, Path(".")):
        files, _ = cohort.discover(folder, "synthetic", [])
        assert [rel for _, rel in files] == [str(p.relative_to(tmp_path)) for p in paths]


def test_only_names_below_the_root_must_be_utf8(tmp_path: Path):
    """A folder the user chose may have any name; a file or folder below it must be UTF-8."""
    root = os.fsencode(tmp_path) + b"/study_\xff"
    os.makedirs(root + b"/bad_\xfe")
    for name in (b"/ok.dcm", b"/bad_\xfe/a.dcm"):
        with open(root + name, "wb") as f:
            f.write(b"x")
    paths, skipped = listing.list_files(Path(os.fsdecode(root)))
    assert [p.name for p in paths] == ["ok.dcm"]
    assert [(r["path"], r["reason"]) for r in skipped] == [
        ("bad_\\xfe/a.dcm", "file name is not valid UTF-8")
    ]
