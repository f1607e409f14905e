"""Many files at once: de-identification and the leak scan in worker processes.

Three passes: every input header is read for the cohort's person names (scrubbed from every kept
descriptor, :mod:`ctpipe.deid.freetext`); every file is de-identified; every output is read back
and scanned for the identifying values collected from the inputs, for the free-text patterns and
for the cohort's names (:mod:`ctpipe.deid.verify`). The stage hands each worker the options, key,
names and output folder once (the pool initialisers); each file is then one call.
"""

from __future__ import annotations

import logging
import multiprocessing
import warnings
from pathlib import Path

from pydicom import config, dcmread
from pydicom.dataset import Dataset

from ctpipe.deid.engine import Deidentifier
from ctpipe.deid.files import FileResult, process_file
from ctpipe.deid.freetext import name_components, pn_tokens
from ctpipe.deid.keys import Keyring
from ctpipe.deid.table import DeidOptions, Profile
from ctpipe.deid.verify import (
    Evidence,
    FreeTextCheck,
    NeedleIndex,
    build_indexes,
    name_index,
    scan_file,
    scan_text,
)
from ctpipe.progress import progress

_WORKER: dict = {}  # per-process state, set by the pool initialisers


def quiet_pydicom() -> None:
    """pydicom's value warnings quote the values (PHI): keep them out of logs and consoles."""
    config.settings.reading_validation_mode = config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")


def _names(ds: Dataset) -> list[str]:
    """Person names in one dataset, at every depth: PN values and PN-formatted tokens anywhere
    (a vendor's private ``DOE^JANE``). Values that do not decode are skipped."""
    out: list[str] = []
    for tag in list(ds._dict):
        try:
            elem = ds[tag]
        except Exception:  # noqa: BLE001 - a value pydicom cannot convert names nobody
            continue
        value = elem.value
        if elem.VR == "SQ":
            for item in value or []:
                out += _names(item)
        elif isinstance(value, bytes):
            out += pn_tokens(value.decode("latin-1"))
        elif elem.VR == "PN":
            out += [str(v) for v in (value if elem.VM > 1 else [value]) if v]
        elif isinstance(value, str) and "^" in value:
            out += pn_tokens(value)
    return out


def names_one(item: tuple[str, str]) -> set[str]:
    """Name components in one input file's header (none if it does not read as DICOM)."""
    try:
        ds = dcmread(item[0], stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - the de-identification pass quarantines it with a reason
        return set()
    return name_components(_names(ds))


def init_names() -> None:
    quiet_pydicom()


def cohort_names(items: list[tuple[str, str]], workers: int, chunksize: int) -> set[str]:
    """Components of every person name in every input file (the pre-pass)."""
    found = run_parallel(names_one, items, workers, init_names, (), "names", chunksize)
    return set().union(*found) if found else set()


def init_deid(
    options: dict, key: bytes, cfg: dict, out_dir: Path, names: frozenset[str] = frozenset()
) -> None:
    quiet_pydicom()
    _WORKER["deid"] = Deidentifier(
        DeidOptions(**options), Keyring(key), tuple(cfg["date_shift_days"]), names
    )
    _WORKER["args"] = (
        out_dir,
        {m.upper() for m in cfg["burned_in_missing_ok"]},
        bool(cfg["keep_linkage"]),
    )


def deid_one(item: tuple[str, str]) -> FileResult:
    out_dir, burned_ok, keep_linkage = _WORKER["args"]
    return process_file(Path(item[0]), item[1], _WORKER["deid"], out_dir, burned_ok, keep_linkage)


def init_scan(
    out_dir: Path, per_patient: dict, cross: NeedleIndex, free_text: FreeTextCheck
) -> None:
    quiet_pydicom()
    _WORKER.update(out_dir=out_dir, per_patient=per_patient, cross=cross, free_text=free_text)


def scan_one(item: tuple[str, str]) -> tuple[str, list[str]]:
    out_rel, patient = item
    indexes = [_WORKER["per_patient"].get(patient, NeedleIndex()), _WORKER["cross"]]
    return out_rel, scan_file(_WORKER["out_dir"] / out_rel, indexes, _WORKER["free_text"])


def run_parallel(
    func, items: list, workers: int, init, initargs: tuple, desc: str, chunksize: int
) -> list:
    """``func`` over ``items`` in ``workers`` processes (in this one if 1), with a progress bar."""
    if workers <= 1 or len(items) <= 1:
        init(*initargs)
        return [func(item) for item in progress(items, desc=desc, unit="file")]
    with multiprocessing.Pool(workers, init, initargs) as pool:
        return list(
            progress(
                pool.imap_unordered(func, items, chunksize),
                total=len(items),
                desc=desc,
                unit="file",
            )
        )


def dedupe(results: list[FileResult], items: list[tuple[str, str]], initargs: tuple) -> None:
    """Inputs sharing one SOP Instance UID: the first (by path) wins and is written again, so
    the output does not depend on which worker finished last; the others are quarantined."""
    first: dict[str, FileResult] = {}
    rewrite: set[str] = set()
    for r in results:
        if r.out_rel in first:
            rewrite.add(first[r.out_rel].rel)
            r.reason, r.detail, r.out_rel = "duplicate_sop_instance", "same SOPInstanceUID", ""
        elif r.out_rel:
            first[r.out_rel] = r
    if rewrite:
        init_deid(*initargs)
        for path, rel in items:
            if rel in rewrite:
                deid_one((path, rel))


def global_index(per_patient: dict[str, NeedleIndex], cross: NeedleIndex) -> NeedleIndex:
    """Needles for names and tables shared by all patients: all text and UID-like values."""
    index = NeedleIndex(cross.text and set().union(*cross.text.values()))
    for patient in per_patient.values():
        for tuples in patient.text.values():
            for n in tuples:
                index.add(n)
        for n in patient.exact:
            if n.count(".") >= 2:
                index.add(n)
    return index


def verify(
    out_dir: Path,
    results: list[FileResult],
    evidence: dict[str, Evidence],
    extra_files: list[Path],
    cfg: dict,
    options: DeidOptions,
    names: frozenset[str] = frozenset(),
) -> list[tuple[str, str]]:
    """Scan every output for the input's identifying values, and its free text for the patterns
    and the cohort's ``names``; return (file, finding) pairs."""
    min_chars = int(cfg["leak_min_chars"])
    per_patient, cross = build_indexes(evidence, min_chars)
    shared = global_index(per_patient, cross)
    free_text = FreeTextCheck(frozenset(Profile(options).descriptive), name_index(names, min_chars))
    items = [(r.out_rel, r.patient) for r in results if r.out_rel.startswith("dicom/")]
    scanned = run_parallel(
        scan_one,
        items,
        int(cfg["workers"]),
        init_scan,
        (out_dir, per_patient, cross, free_text),
        "verify",
        int(cfg["chunksize"]),
    )
    leaks = [(rel, finding) for rel, findings in scanned for finding in findings]
    for path in extra_files:  # mhd headers, CSVs, JSON
        text = path.read_text(encoding="latin-1")
        cells = text.replace(",", "\n").replace('"', "\n").splitlines()
        leaks += [(str(path.relative_to(out_dir)), f) for f in scan_text(cells, [shared])]
    names = [part for r in results if r.out_rel for part in Path(r.out_rel).parts]
    leaks += [("<file names>", f) for f in scan_text(names, [shared])]
    return leaks
