"""Write a seeded corpus of hostile DICOM input around one valid CT series.

    python scripts/make_fuzz_corpus.py BASE_SERIES_DIR OUT_DIR [--seed N]

``OUT_DIR/valid/`` is the base series with identifying values planted where real exports put them
(names, IDs, a doctor nobody lists in a comment, a phone number, an e-mail address). Every other
folder is one mutation family: a copy of the series (new Series/SOP Instance UIDs) with one kind of
damage, in every slice or in one. At the top level: special entries (a symbolic-link loop, a
dangling link, a FIFO, a file name that is not UTF-8), a DICOMDIR, a text file, an empty file.
``OUT_DIR.json`` (next to the folder, not in it) lists the families, what each entry point must do with them
(``expect``: ``usable`` or ``unusable``, null where either is right) and the planted values,
which no de-identified output may contain. Files are small; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

FREE_TEXT = {
    "ImageComments": "seen by Dr Fenwick Oddsworth on ward 7",
    "PatientComments": "call +44 20 7946 0958 or f.oddsworth@example.org",
    "StudyDescription": "CT CHEST - QUINCE^MARGARETTA",
}
PLANTED_TEXT = ["fenwick", "oddsworth", "7946 0958", "example.org", "quince", "margaretta"]
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyID")


def raw_value(ds: pydicom.Dataset, keyword: str, vr: str, value) -> None:
    """Set an element to a value as a broken export writes it (pydicom would refuse IS/DS ones)."""
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if vr in ("IS", "DS"):
        elem = DataElement(tag, "LO", value if isinstance(value, list) else [value])
        elem.VR = vr  # the text written as is, not converted
    else:
        elem = DataElement(tag, vr, value)
    ds[tag] = elem


Mutation = Callable[[pydicom.Dataset, int, np.random.Generator], pydicom.Dataset | None]


def header(keyword: str, vr: str, value) -> Mutation:
    def apply(ds, index, rng):
        raw_value(ds, keyword, vr, value)
        return ds

    return apply


def delete(keyword: str) -> Mutation:
    def apply(ds, index, rng):
        delattr(ds, keyword)
        return ds

    return apply


def rows_off(ds, index, rng):
    ds.Rows = int(ds.Rows) + 7
    return ds


def bits8(ds, index, rng):
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    return ds


def localizer(ds, index, rng):
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    return ds


def non_ct(ds, index, rng):
    ds.Modality = "MR"
    return ds


def long_text(ds, index, rng):
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Ødegård^Zoë=オデゴール^ゾエ"
    raw_value(ds, "SeriesDescription", "LO", "Lung " + "x" * 5000)  # LO holds 64 at most
    return ds


def huge_private(ds, index, rng):
    block = ds.private_block(0x0041, "CTPIPE_FUZZ", create=True)
    block.add_new(0x01, "OB", bytes(rng.integers(0, 256, 1 << 20, dtype=np.uint8)))
    block.add_new(0x02, "LO", str(ds.PatientName))
    return ds


def pixel_flips(ds, index, rng):
    data = bytearray(ds.PixelData)
    for pos in rng.integers(0, len(data), 64):
        data[pos] ^= 0xFF
    ds.PixelData = bytes(data)
    return ds


def shared_uid(ds, index, rng):
    """Every other slice: another acquisition (frame of reference, position) under one UID."""
    if index % 2:
        ds.FrameOfReferenceUID = "2.25.314159265358979323846264338327950288"
        ds.ImagePositionPatient = [0.0, 0.0, float(ds.ImagePositionPatient[2]) + 0.5]
    return ds


def few_slices(ds, index, rng):
    return ds if index < 4 else None


def duplicate_sop(ds, index, rng):
    """The first two slices under one SOP Instance UID (one of them must be reported)."""
    if index < 2:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
            "2.25.271828182845904523536028747135266249"
        )
    return ds


# name -> (mutation, which slices: "all" | "one", expect, transfer syntax or None)
FAMILIES: dict[str, tuple[Mutation, str, str | None, str | None]] = {
    "instance_number_abc": (header("InstanceNumber", "IS", "abc"), "all", "usable", None),
    "frames_abc": (header("NumberOfFrames", "IS", "abc"), "all", "unusable", None),
    "rgb": (header("SamplesPerPixel", "US", 3), "all", "unusable", None),
    "bits_stored_20": (header("BitsStored", "US", 20), "all", "unusable", None),
    "bits_allocated_8": (bits8, "all", "unusable", None),
    "no_bits_allocated": (delete("BitsAllocated"), "all", "unusable", None),
    "rows_disagree": (rows_off, "all", "unusable", None),
    "spacing_zero": (header("PixelSpacing", "DS", ["0", "0.7"]), "all", "unusable", None),
    "spacing_negative": (header("PixelSpacing", "DS", ["-0.7", "0.7"]), "all", "unusable", None),
    "spacing_nan": (header("PixelSpacing", "DS", ["nan", "0.7"]), "all", "unusable", None),
    "position_inf": (
        header("ImagePositionPatient", "DS", ["0", "inf", "0"]),
        "all",
        "unusable",
        None,
    ),
    "position_nan": (
        header("ImagePositionPatient", "DS", ["nan", "0", "0"]),
        "all",
        "unusable",
        None,
    ),
    "orientation_scaled": (
        header("ImageOrientationPatient", "DS", ["2", "0", "0", "0", "1", "0"]),
        "all",
        "unusable",
        None,
    ),
    "orientation_parallel": (
        header("ImageOrientationPatient", "DS", ["1", "0", "0", "1", "0", "0"]),
        "all",
        "unusable",
        None,
    ),
    "orientation_short": (
        header("ImageOrientationPatient", "DS", ["1", "0", "0"]),
        "all",
        "unusable",
        None,
    ),
    "localizer": (localizer, "all", "unusable", None),
    "not_ct": (non_ct, "all", "unusable", None),
    "too_few_slices": (few_slices, "all", "unusable", None),
    "shared_series_uid": (shared_uid, "all", "unusable", None),
    "duplicate_sop_uid": (duplicate_sop, "all", None, None),
    "non_ascii_long_strings": (long_text, "all", "usable", None),
    "huge_private_element": (huge_private, "one", "usable", None),
    "pixel_byte_flips": (pixel_flips, "all", "usable", None),
    "implicit_vr": (lambda ds, i, r: ds, "all", "usable", ImplicitVRLittleEndian),
    "big_endian": (lambda ds, i, r: ds, "all", "usable", ExplicitVRBigEndian),
    "deflated": (lambda ds, i, r: ds, "all", "usable", DeflatedExplicitVRLittleEndian),
}
BYTE_FAMILIES = ("header_byte_flips", "truncated_slice", "empty_file")  # damage to file bytes


def plant(ds: pydicom.Dataset) -> pydicom.Dataset:
    for keyword, value in FREE_TEXT.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: pydicom.Dataset, path: Path, syntax: str | None) -> None:
    """Write ``ds`` as it is (bad values included); in ``syntax`` when given, re-encoded."""
    if syntax is not None:
        fresh = pydicom.Dataset()
        for elem in ds:
            fresh.add(elem)
        fresh.file_meta = ds.file_meta
        fresh.file_meta.TransferSyntaxUID = syntax
        ds = fresh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config.settings.writing_validation_mode = config.IGNORE
        try:
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
        finally:
            config.settings.writing_validation_mode = config.WARN


def copy_series(base: list[Path], out: Path, name: str, rng, mutation, which, syntax) -> list[str]:
    folder = out / name
    folder.mkdir(parents=True)
    series_uid, written = generate_uid(), []
    target = int(rng.integers(0, len(base)))
    for index, path in enumerate(base):
        ds = plant(pydicom.dcmread(path))
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if which == "all" or index == target:
            ds = mutation(ds, index, rng)
        if ds is None:
            continue
        save(ds, folder / path.name, syntax)
        written.append(f"{name}/{path.name}")
    return written


def byte_family(base: list[Path], out: Path, name: str, rng) -> list[str]:
    """A valid copy of the series, then one slice's bytes damaged."""
    written = copy_series(base, out, name, rng, lambda ds, i, r: ds, "all", None)
    victim = out / written[int(rng.integers(0, len(written)))]
    data = bytearray(victim.read_bytes())
    if name == "header_byte_flips":
        for pos in rng.integers(132, min(len(data), 1200), 24):
            data[pos] = int(rng.integers(0, 256))
    elif name == "truncated_slice":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    victim.write_bytes(bytes(data))
    return written


def special_entries(out: Path, base: list[Path]) -> list[str]:
    (out / "loop").symlink_to(out)
    (out / "dangling.dcm").symlink_to(out / "missing.dcm")
    os.mkfifo(out / "fifo.dcm")
    (out / os.fsdecode(b"caf\xe9.dcm")).write_bytes(base[0].read_bytes())
    shutil.copy(get_testdata_file("DICOMDIR"), out / "DICOMDIR")
    (out / "notes Oddsworth.txt").write_text("Patient QUINCE^MARGARETTA, seen by Dr Fenwick")
    return ["loop", "dangling.dcm", "fifo.dcm", "caf\\xe9.dcm", "DICOMDIR", "notes Oddsworth.txt"]


def planted_values(base: list[Path]) -> list[str]:
    """Identifying values of the base series (and the free text planted), lower case."""
    ds = pydicom.dcmread(base[0], stop_before_pixels=True)
    values = set(PLANTED_TEXT)
    for keyword in PHI_KEYWORDS:
        value = str(ds.get(keyword, "") or "")
        values.add(value)
        values.update(part for part in value.replace("=", "^").split("^"))
    values.update({"ødegård", "zoë"})
    return sorted(v.lower() for v in values if len(v) >= 4)


def make_corpus(base_dir: Path, out: Path, seed: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about every value this corpus breaks
        return _make_corpus(base_dir, out, seed)


def _make_corpus(base_dir: Path, out: Path, seed: int) -> dict:
    base = sorted(base_dir.rglob("*.dcm"))
    if not base:
        raise SystemExit(f"{base_dir}: no .dcm files to build the corpus from")
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=False)
    families = {
        "valid": {
            "files": copy_series(base, out, "valid", rng, lambda ds, i, r: ds, "all", None),
            "expect": "usable",
        }
    }
    for name, (mutation, which, expect, syntax) in FAMILIES.items():
        files = copy_series(base, out, name, rng, mutation, which, syntax)
        families[name] = {"files": files, "expect": expect}
    for name in BYTE_FAMILIES:
        families[name] = {"files": byte_family(base, out, name, rng), "expect": None}
    families["special_entries"] = {"files": special_entries(out, base), "expect": "unusable"}
    corpus = {"seed": seed, "families": families, "planted": planted_values(base)}
    out.with_name(out.name + ".json").write_text(
        json.dumps(corpus, indent=1, ensure_ascii=False), encoding="utf-8"
    )
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_dir", type=Path, help="folder of one valid CT series (*.dcm)")
    parser.add_argument("out_dir", type=Path, help="new folder for the corpus")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    corpus = make_corpus(args.base_dir, args.out_dir, args.seed)
    n_files = sum(len(f["files"]) for f in corpus["families"].values())
    print(f"{len(corpus['families'])} families, {n_files} entries in {args.out_dir}")


if __name__ == "__main__":
    main()
