"""Many files at once: de-identification and the leak scan in worker processes.

Two passes, each over every file in worker processes (the stage hands each worker the options,
key and output folder once, in the pool initialisers; files go out in chunks):

1. Every input is read once: the person names it holds are collected, and it is de-identified
   and written. A kept descriptor must also lose every name seen anywhere in the cohort
   (:mod:`ctpipe.deid.freetext`), known only once every file has been read: a file whose
   scrubbed descriptors hold a word that may be one of those names, not already removed by the
   file's own values, is de-identified again with them (:meth:`freetext.Terms.may_change`);
   in an ordinary cohort, none or a few.
2. Every output is read back and scanned for the identifying values collected from the inputs,
   for the free-text patterns and for the cohort's names (:mod:`ctpipe.deid.verify`).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import warnings
from pathlib import Path

from pydicom import config
from tqdm import tqdm

from ctpipe.deid.engine import Deidentifier
from ctpipe.deid.files import FileResult, process_file
from ctpipe.deid.freetext import Terms
from ctpipe.deid.keys import Keyring
from ctpipe.deid.names import names_of_file
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

_WORKER: dict = {}  # per-process state, set by the pool initialisers
CHUNKS_PER_WORKER = 8
log = logging.getLogger("ctpipe.deid.batch")


def quiet_pydicom() -> None:
    """pydicom's value warnings quote the values (PHI): keep them out of logs and consoles."""
    config.settings.reading_validation_mode = config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")


def names_one(item: tuple[str, str]) -> set[str]:
    """Name components in one input file's header (none if it does not read as DICOM)."""
    return names_of_file(Path(item[0]))


def init_names() -> None:
    quiet_pydicom()


def cohort_names(items: list[tuple[str, str]], workers: int, chunksize: int) -> set[str]:
    """Components of every person name in every input file, without de-identifying them (the
    de-identification pass collects them as it reads the files: :func:`deidentify`)."""
    found = run_parallel(names_one, items, workers, init_names, (), "names", chunksize)
    return set().union(*found) if found else set()


def init_deid(
    options: dict,
    key: bytes,
    date_shift_days: tuple[int, int],
    out_dir: Path,
    burned_in_missing_ok: frozenset[str],
    keep_linkage: bool,
    names: frozenset[str] = frozenset(),
) -> None:
    quiet_pydicom()
    _WORKER["deid"] = Deidentifier(DeidOptions(**options), Keyring(key), date_shift_days, names)
    _WORKER["args"] = (out_dir, burned_in_missing_ok, keep_linkage)


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
    """``func`` over ``items`` in ``workers`` processes (in this process if 1 worker or one
    chunk), with a progress bar. Items go out in chunks of ``chunksize`` or more: about
    :data:`CHUNKS_PER_WORKER` per worker, so that a worker keeps a patient's files together (its
    caches) and round trips stay few, while the last chunks still even out the workers."""
    chunksize = max(chunksize, math.ceil(len(items) / (CHUNKS_PER_WORKER * max(workers, 1))))
    if workers <= 1 or len(items) <= chunksize:
        init(*initargs)
        return [func(item) for item in tqdm(items, desc=desc, unit="file")]
    with multiprocessing.Pool(workers, init, initargs) as pool:
        return list(
            tqdm(
                pool.imap_unordered(func, items, chunksize),
                total=len(items),
                desc=desc,
                unit="file",
            )
        )


def deidentify(
    items: list[tuple[str, str]], options: DeidOptions, key: bytes, cfg: dict, out_dir: Path
) -> tuple[list[FileResult], frozenset[str]]:
    """Every input de-identified and written to ``out_dir`` (``cfg``: the stage's params),
    sorted by input path; and the cohort's name components."""
    workers, chunksize = int(cfg["workers"]), int(cfg["chunksize"])
    burned_ok = frozenset(m.upper() for m in cfg["burned_in_missing_ok"])
    shift = (int(cfg["date_shift_days"][0]), int(cfg["date_shift_days"][1]))
    initargs = (options.as_dict(), key, shift, out_dir, burned_ok, bool(cfg["keep_linkage"]))
    results = run_parallel(deid_one, items, workers, init_deid, initargs, "anonymize", chunksize)
    results.sort(key=lambda r: r.rel)
    names = frozenset(set().union(*(r.names for r in results)))
    cohort = Terms(names)
    again = dedupe(results) | {
        r.rel for r in results if r.out_rel and cohort.may_change(r.words, r.removed, r.pairs)
    }
    if again:
        log.info("%d files de-identified again (a duplicate, or names of the cohort)", len(again))
        redo = [item for item in items if item[1] in again]
        redone = run_parallel(
            deid_one, redo, workers, init_deid, (*initargs, names), "names", chunksize
        )
        by_rel = {r.rel: r for r in redone}
        results = [by_rel.get(r.rel, r) for r in results]
    return results, names


def dedupe(results: list[FileResult]) -> set[str]:
    """Inputs sharing one SOP Instance UID: the first (by path) wins and is written again (the
    inputs returned), so the output does not depend on which worker finished last; the others
    are quarantined."""
    first: dict[str, FileResult] = {}
    rewrite: set[str] = set()
    for r in results:
        if r.out_rel in first:
            rewrite.add(first[r.out_rel].rel)
            r.reason, r.detail, r.out_rel = "duplicate_sop_instance", "same SOPInstanceUID", ""
        elif r.out_rel:
            first[r.out_rel] = r
    return rewrite


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
