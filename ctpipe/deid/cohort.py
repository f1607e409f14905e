"""The cohort around de-identification: where the input files are, its annotations, the output
folder, and the tables written next to the de-identified files (audit, quarantine, options).

:mod:`ctpipe.deid.stage` strings these together with :mod:`ctpipe.deid.batch`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pandas as pd

from ctpipe import annotations, config, prefork
from ctpipe.deid import batch
from ctpipe.deid.files import FileResult, Quarantine, copy_mhd
from ctpipe.deid.keys import Keyring
from ctpipe.deid.table import DeidOptions, table_info
from ctpipe.deid.verify import Evidence
from ctpipe.fileio import read_json, write_csv, write_json
from ctpipe.listing import list_files
from ctpipe.progress import progress
from ctpipe.safepath import inside

log = logging.getLogger("anonymize")
OWN_FILES = ("annotations.csv", "audit.csv", "quarantine.csv", "deid_options.json")


class InputError(ValueError):
    """INPUT_DIR cannot be read as a cohort: the message names the file and the reason."""


SOURCES = ("synthetic", "dicom", "luna16")


def cohort_source(input_dir: Path) -> str:
    """The cohort's source from ``cohort.json``; ``real`` (a plain folder of DICOM files) when
    there is none, or when a stray one sits in a folder without ingest's ``dicom/`` layout."""
    cohort = input_dir / "cohort.json"
    if not cohort.is_file():
        return "real"
    try:
        source = read_json(cohort).get("source")
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        source = f"unreadable ({type(err).__name__})"
    layout = (input_dir / "dicom").is_dir() or (input_dir / "images").is_dir()
    if source in SOURCES and layout:
        return str(source)
    if layout:  # ingest's layout with a broken cohort.json: do not guess
        raise InputError(f"{cohort}: source {source!r} is not one of {', '.join(SOURCES)}")
    log.warning("%s: not ingest's layout (no dicom/); reading the folder as DICOM files", cohort)
    return "real"


def discover(
    input_dir: Path, source: str, exclude: list[Path]
) -> tuple[list[tuple[str, str]], list[FileResult]]:
    """Return ([(absolute path, path relative to INPUT_DIR)], results of the entries that are no
    regular file: quarantined ``unusable`` with the reason) of a cohort from ``source``
    (:func:`cohort_source`).

    In a plain folder (source ``real``) every regular file is an input, stray CSV and JSON files
    included (they are quarantined as not DICOM, so they are reported, not silently ignored).

    Raises:
        InputError: no input file at all.
    """
    root = input_dir / "dicom" if source != "real" else input_dir
    if not root.is_dir():
        root = None
    files, unusable = [], []
    if root is not None:  # skip the stage's own outputs when they lie inside the input folder
        skip = [p.resolve() for p in exclude if root.resolve() in p.resolve().parents]
        paths, entries = list_files(root)
        base = str(input_dir)
        start = 0 if base == "." else len(os.path.join(base, ""))  # "dicom/a.dcm", as relative_to
        for path in paths:
            if not (skip and any(s in path.resolve().parents for s in skip)):
                text = str(path)
                files.append((text, text[start:]))
        prefix = "" if root == input_dir else f"{root.name}/"
        for entry in entries:  # links to folders, dangling links, FIFOs, undecodable names
            if not (skip and any(s in (root / entry["path"]).parents for s in skip)):
                unusable.append(
                    FileResult(
                        rel=prefix + entry["path"], reason="unusable", detail=entry["reason"]
                    )
                )
    if not files and not (source == "luna16" and list((input_dir / "images").rglob("*.mhd"))):
        raise InputError(f"{input_dir}: no input files (DICOM under dicom/ or the folder itself)")
    return files, unusable


def prepare_output(out_dir: Path) -> None:
    """Empty OUTPUT_DIR if a previous run of this stage wrote it; refuse any other content."""
    if out_dir.is_dir():
        foreign = [
            p.name
            for p in out_dir.iterdir()
            if p.is_symlink()  # a link may lead out: never deleted or written through
            or (p.name not in ("dicom", "images", *OWN_FILES) and not p.name.endswith(".tmp"))
        ]
        if foreign:
            raise SystemExit(f"{out_dir} holds files this stage did not write, e.g. {foreign[0]}")
        for name in ("dicom", "images"):
            shutil.rmtree(inside(out_dir, out_dir / name), ignore_errors=True)
        for name in OWN_FILES:
            inside(out_dir, out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def luna16_images(
    input_dir: Path, out_dir: Path, keyring: Keyring, evidence: dict[str, Evidence]
) -> tuple[list[FileResult], list[Path]]:
    """Copy every ``images/*.mhd`` pair renamed to the remapped series UID."""
    (files, entries), written = list_files(input_dir / "images"), []
    results = [FileResult(f"images/{e['path']}", "unusable", e["reason"]) for e in entries]
    for mhd in progress([f for f in files if f.suffix == ".mhd"], desc="luna16", unit="image"):
        rel = str(mhd.relative_to(input_dir))
        new = keyring.uid(mhd.stem)
        result = FileResult(
            rel=rel, patient=new, series=new, study=new, out_rel=f"images/{new}.mhd"
        )
        try:
            paths, dropped = copy_mhd(mhd, out_dir / "images", new)
        except Quarantine as q:
            result.reason, result.detail, result.out_rel = q.reason, q.detail, ""
        else:
            written += paths
            evidence[new].ident.add(mhd.stem.lower())
            result.audit = {
                "file": result.out_rel,
                "sop_class": "",
                "modality": "mhd",
                "n_X": dropped,
                "actions": "ElementDataFile=U",
            }
        results.append(result)
    return results, written


def load_annotations(input_dir: Path, source: str) -> pd.DataFrame:
    """``annotations.csv`` (empty if absent): the LUNA16 columns and the optional nodule kinds of
    :mod:`ctpipe.annotations`, nothing else. A plain folder (source ``real``) has none: a CSV in
    it is an input file like any other (quarantined as not DICOM, so reported).

    Raises:
        InputError: ``annotations.csv`` unreadable, without the LUNA16 columns, or with a nodule
            kind that is not a short word.
    """
    path = input_dir / "annotations.csv"
    if source == "real" or not path.is_file():
        return pd.DataFrame(columns=annotations.REQUIRED)
    try:
        frame = pd.read_csv(path, dtype={"seriesuid": str})
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: unreadable CSV ({type(err).__name__})") from None
    try:
        return annotations.select(frame, str(path))
    except ValueError as err:
        raise InputError(str(err)) from None


def remap_annotations(
    frame: pd.DataFrame, keyring: Keyring, series_out: set[str]
) -> tuple[pd.DataFrame, int]:
    """Annotations with ``seriesuid`` remapped; rows of series not written are dropped."""
    frame = frame.copy()
    frame["seriesuid"] = [keyring.uid(u) for u in frame["seriesuid"].astype(str)]
    kept = frame[frame["seriesuid"].isin(series_out)]
    if len(kept) < len(frame):
        log.warning(
            "%d annotation rows refer to series not written (quarantined or absent)",
            len(frame) - len(kept),
        )
    return kept.reset_index(drop=True), len(frame)


def write_tables(
    out_dir: Path,
    private_dir: Path,
    results: list[FileResult],
    keyring: Keyring,
    options: DeidOptions,
    meta: dict,
) -> None:
    """audit.csv, quarantine.csv (public and private), linkage.csv, deid_options.json."""
    codes = ";".join(options.codes())
    audit = pd.DataFrame([{**r.audit, "options": codes} for r in results if not r.reason])
    write_csv(out_dir / "audit.csv", audit.sort_values("file") if len(audit) else audit)
    bad = [r for r in results if r.reason]
    public = pd.DataFrame(
        [{"path_hash": keyring.path_hash(r.rel), "reason": r.reason} for r in bad],
        columns=["path_hash", "reason"],
    )
    write_csv(out_dir / "quarantine.csv", public.sort_values("path_hash"))
    private = pd.DataFrame(
        [
            {
                "path": r.rel,
                "path_hash": keyring.path_hash(r.rel),
                "reason": r.reason,
                "detail": r.detail,
            }
            for r in bad
        ],
        columns=["path", "path_hash", "reason", "detail"],
    )
    write_csv(private_dir / "quarantine.csv", private.sort_values("path"))
    linkage = sorted({row for r in results for row in r.linkage})
    if linkage:
        write_csv(
            private_dir / "linkage.csv",
            pd.DataFrame(linkage, columns=["kind", "original", "pseudonym"]),
        )
    write_json(out_dir / "deid_options.json", meta)
    # Which key made this cohort, kept where it is not pushed (it would be a guessing oracle).
    write_json(
        private_dir / "deid_key.json",
        {"key_fingerprint": keyring.fingerprint(), "key_source": meta["key_source"]},
    )


def deid_meta(
    options: DeidOptions, source: str, keyring: Keyring, key_source: str, cfg: config.Anonymize
) -> dict:
    """deid_options.json: the profile, options and table this cohort was de-identified with."""
    info = table_info()
    return {
        "profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
        "codes": options.codes(),
        "options": options.as_dict(),
        "cohort_source": source,
        "table": {
            k: info[k]
            for k in (
                "table",
                "version",
                "rows",
                "deid_profile_csv_sha256",
                "safe_private_rows",
                "sources",
            )
        },
        "uid_scheme": "2.25.<int(HMAC-SHA256(key, uid)[:16])>",
        "key_source": key_source,
        "date_shift_days": cfg.date_shift_days,
        "burned_in_missing_ok": cfg.burned_in_missing_ok,
        "leak_min_chars": batch.LEAK_MIN_CHARS,
    }


def run_metrics(
    results: list[FileResult],
    written: list[FileResult],
    n_annotations: int,
    annotations: pd.DataFrame,
    leaks: list,
    start: tuple[float, float],
) -> dict:
    """Counts, and the wall and CPU seconds (workers included) since ``start``."""
    reasons = Counter(r.reason for r in results if r.reason)
    seconds = time.perf_counter() - start[0]
    return {
        "files_in": len(results),
        "files_out": len(written),
        "files_quarantined": sum(reasons.values()),
        "series_out": len({r.series for r in written}),
        "patients_out": len({r.patient for r in written}),
        "annotations_in": n_annotations,
        "annotations_out": len(annotations),
        "leaks_found": len(leaks),
        "seconds": seconds,
        "cpu_seconds": prefork.cpu_seconds() - start[1],
        "files_per_s": len(results) / seconds if seconds else 0.0,
        "quarantine_reasons": dict(sorted(reasons.items())),
    }


def remove_leaking(leaks: list, out_dir: Path, private_dir: Path) -> None:
    """Delete every output file the leak gate found an identifier in; list them privately."""
    write_csv(private_dir / "leaks.csv", pd.DataFrame(leaks, columns=["file", "finding"]))
    files = sorted({rel for rel, _ in leaks})
    for rel in files:
        inside(out_dir, out_dir / rel).unlink(missing_ok=True)
    where = private_dir / "leaks.csv"
    log.error("%d identifying values in %d files, deleted (see %s)", len(leaks), len(files), where)
