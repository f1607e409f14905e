"""Stage anonymize: the boundary PHI never crosses (DICOM PS3.15 Annex E, Basic Profile + options).

In:  INPUT_DIR (``data/raw`` from ingest): ``dicom/**`` (any tree of DICOM files; names may carry
     PHI), ``annotations.csv`` (seriesuid,coordX,coordY,coordZ,diameter_mm), ``cohort.json``
     (``{"source": "synthetic" | "dicom" | "luna16"}``); for luna16 ``images/*.mhd`` + data files.
     A folder with neither ``dicom/`` nor ``cohort.json`` is read as a plain folder of DICOM files
     (a real cohort: a key is required; no annotations).
Out: OUTPUT_DIR (pushable, no PHI): ``dicom/<Study UID>/<Series UID>/<SOP UID>.dcm``,
     ``annotations.csv`` (seriesuid remapped), ``images/`` (luna16), ``audit.csv`` (actions per
     output file), ``quarantine.csv`` (keyed hash of the input path + reason),
     ``deid_options.json`` (profile, options, table version; no secret).
     ``--private-dir`` (``push: false``): ``quarantine.csv`` with the original paths and details,
     ``linkage.csv`` (original -> pseudonym) when ``keep_linkage``, ``leaks.csv`` on failure.
     ``--metrics``: files in/out/quarantined, series, patients, leaks_found, seconds, files/s.
Secret: ``CTPIPE_DEID_KEY``, else ``anonymize.key_file``; only the synthetic cohort may fall back
to the public demo key. After writing, every output (values at every depth, file names, CSVs) is
scanned for the identifying values found in the input (``ctpipe.deid_verify``): any survivor
fails the stage and its file is deleted.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import shutil
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
from pydicom import config
from tqdm import tqdm

from ctpipe.deid import Deidentifier
from ctpipe.deid_files import FileResult, Quarantine, copy_mhd, process_file
from ctpipe.deid_keys import DeidKeyError, Keyring, load_key
from ctpipe.deid_table import DeidOptions, table_info
from ctpipe.deid_verify import Evidence, NeedleIndex, build_indexes, scan_file, scan_text
from ctpipe.fileio import read_json, rounded, write_csv, write_json
from ctpipe.params import stage_params
from ctpipe.runenv import record as record_environment

log = logging.getLogger("anonymize")
ANNOTATION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
OWN_FILES = ("annotations.csv", "audit.csv", "quarantine.csv", "deid_options.json")
_WORKER: dict = {}  # per-process state, set by the pool initialisers


def quiet_pydicom() -> None:
    """pydicom's value warnings quote the values (PHI): keep them out of logs and consoles."""
    config.settings.reading_validation_mode = config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")


def _init_deid(options: dict, key: bytes, cfg: dict, out_dir: Path) -> None:
    quiet_pydicom()
    _WORKER["deid"] = Deidentifier(DeidOptions(**options), Keyring(key), tuple(cfg["date_shift_days"]))
    _WORKER["args"] = (out_dir, {m.upper() for m in cfg["burned_in_missing_ok"]},
                       bool(cfg["keep_linkage"]))


def _deid_one(item: tuple[str, str]) -> FileResult:
    out_dir, burned_ok, keep_linkage = _WORKER["args"]
    return process_file(Path(item[0]), item[1], _WORKER["deid"], out_dir, burned_ok, keep_linkage)


def _init_scan(out_dir: Path, per_patient: dict, cross: NeedleIndex) -> None:
    quiet_pydicom()
    _WORKER.update(out_dir=out_dir, per_patient=per_patient, cross=cross)


def _scan_one(item: tuple[str, str]) -> tuple[str, list[str]]:
    out_rel, patient = item
    indexes = [_WORKER["per_patient"].get(patient, NeedleIndex()), _WORKER["cross"]]
    return out_rel, scan_file(_WORKER["out_dir"] / out_rel, indexes)


def run_parallel(func, items: list, workers: int, init, initargs: tuple, desc: str,
                 chunksize: int) -> list:
    """``func`` over ``items`` in ``workers`` processes (in this one if 1), with a progress bar."""
    if workers <= 1 or len(items) <= 1:
        init(*initargs)
        return [func(item) for item in tqdm(items, desc=desc, unit="file")]
    with multiprocessing.Pool(workers, init, initargs) as pool:
        return list(tqdm(pool.imap_unordered(func, items, chunksize), total=len(items),
                         desc=desc, unit="file"))


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
        _init_deid(*initargs)
        for path, rel in items:
            if rel in rewrite:
                _deid_one((path, rel))


def discover(input_dir: Path, exclude: list[Path]) -> tuple[str, Path | None, list[tuple[str, str]]]:
    """Return (cohort source, DICOM root, [(absolute path, path relative to INPUT_DIR)])."""
    cohort = input_dir / "cohort.json"
    source = str(read_json(cohort).get("source", "dicom")) if cohort.is_file() else "real"
    root = input_dir / "dicom"
    if not root.is_dir():
        root = None if cohort.is_file() else input_dir
    files = []
    if root is not None:  # skip the stage's own outputs when they lie inside the input folder
        skip = [p.resolve() for p in exclude if root.resolve() in p.resolve().parents]
        for path in sorted(root.rglob("*")):
            if path.is_file() and not (skip and any(s in path.resolve().parents for s in skip)):
                files.append((str(path), str(path.relative_to(input_dir))))
    return source, root, files


def prepare_output(out_dir: Path) -> None:
    """Empty OUTPUT_DIR if a previous run of this stage wrote it; refuse any other content."""
    if out_dir.is_dir():
        foreign = [p.name for p in out_dir.iterdir()
                   if p.name not in ("dicom", "images", *OWN_FILES) and not p.name.endswith(".tmp")]
        if foreign:
            raise SystemExit(f"{out_dir} holds files this stage did not write, e.g. {foreign[0]}")
        for name in ("dicom", "images"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        for name in OWN_FILES:
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def luna16_images(input_dir: Path, out_dir: Path, keyring: Keyring,
                  evidence: dict[str, Evidence]) -> tuple[list[FileResult], list[Path]]:
    """Copy every ``images/*.mhd`` pair renamed to the remapped series UID."""
    results, written = [], []
    for mhd in tqdm(sorted((input_dir / "images").rglob("*.mhd")), desc="luna16", unit="image"):
        rel = str(mhd.relative_to(input_dir))
        new = keyring.uid(mhd.stem)
        result = FileResult(rel=rel, patient=new, series=new, study=new,
                            out_rel=f"images/{new}.mhd")
        try:
            paths, dropped = copy_mhd(mhd, out_dir / "images", new)
        except Quarantine as q:
            result.reason, result.detail, result.out_rel = q.reason, q.detail, ""
        else:
            written += paths
            evidence[new].ident.add(mhd.stem.lower())
            result.audit = {"file": result.out_rel, "sop_class": "", "modality": "mhd",
                            "n_X": dropped, "actions": "ElementDataFile=U"}
        results.append(result)
    return results, written


def remap_annotations(input_dir: Path, keyring: Keyring, series_out: set[str]
                      ) -> tuple[pd.DataFrame, int]:
    """Annotations with ``seriesuid`` remapped; rows of series not written are dropped."""
    path = input_dir / "annotations.csv"
    if not path.is_file():
        return pd.DataFrame(columns=ANNOTATION_COLUMNS), 0
    frame = pd.read_csv(path, dtype={"seriesuid": str})
    frame["seriesuid"] = [keyring.uid(u) for u in frame["seriesuid"].astype(str)]
    kept = frame[frame["seriesuid"].isin(series_out)]
    if len(kept) < len(frame):
        log.warning("%d annotation rows refer to series not written (quarantined or absent)",
                    len(frame) - len(kept))
    return kept[ANNOTATION_COLUMNS].reset_index(drop=True), len(frame)


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


def verify(out_dir: Path, results: list[FileResult], evidence: dict[str, Evidence],
           extra_files: list[Path], cfg: dict) -> list[tuple[str, str]]:
    """Scan every output for the input's identifying values; return (file, finding) pairs."""
    per_patient, cross = build_indexes(evidence, int(cfg["leak_min_chars"]))
    shared = global_index(per_patient, cross)
    items = [(r.out_rel, r.patient) for r in results if r.out_rel.startswith("dicom/")]
    scanned = run_parallel(_scan_one, items, int(cfg["workers"]), _init_scan,
                           (out_dir, per_patient, cross), "verify", int(cfg["chunksize"]))
    leaks = [(rel, finding) for rel, findings in scanned for finding in findings]
    for path in extra_files:  # mhd headers, CSVs, JSON
        text = path.read_text(encoding="latin-1")
        cells = text.replace(",", "\n").replace('"', "\n").splitlines()
        leaks += [(str(path.relative_to(out_dir)), f) for f in scan_text(cells, [shared])]
    names = [part for r in results if r.out_rel for part in Path(r.out_rel).parts]
    leaks += [("<file names>", f) for f in scan_text(names, [shared])]
    return leaks


def write_tables(out_dir: Path, private_dir: Path, results: list[FileResult], keyring: Keyring,
                 options: DeidOptions, meta: dict) -> None:
    """audit.csv, quarantine.csv (public and private), linkage.csv, deid_options.json."""
    codes = ";".join(options.codes())
    audit = pd.DataFrame([{**r.audit, "options": codes} for r in results if not r.reason])
    write_csv(out_dir / "audit.csv", audit.sort_values("file") if len(audit) else audit)
    bad = [r for r in results if r.reason]
    public = pd.DataFrame([{"path_hash": keyring.path_hash(r.rel), "reason": r.reason} for r in bad],
                          columns=["path_hash", "reason"])
    write_csv(out_dir / "quarantine.csv", public.sort_values("path_hash"))
    private = pd.DataFrame([{"path": r.rel, "path_hash": keyring.path_hash(r.rel),
                             "reason": r.reason, "detail": r.detail} for r in bad],
                           columns=["path", "path_hash", "reason", "detail"])
    write_csv(private_dir / "quarantine.csv", private.sort_values("path"))
    linkage = sorted({row for r in results for row in r.linkage})
    if linkage:
        write_csv(private_dir / "linkage.csv",
                  pd.DataFrame(linkage, columns=["kind", "original", "pseudonym"]))
    write_json(out_dir / "deid_options.json", meta)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", type=Path, help="raw cohort (data/raw), holds PHI")
    parser.add_argument("output_dir", type=Path, help="de-identified cohort (data/anonymized)")
    parser.add_argument("--private-dir", type=Path, default=None,
                        help="push: false folder for original paths and linkage "
                             "(default: OUTPUT_DIR + '_private')")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/anonymize.json"))
    args = parser.parse_args(argv)
    cfg, _seed = stage_params("anonymize", args.params)
    record_environment("anonymize", Path(args.metrics).parent / "env")
    start = time.perf_counter()
    out_dir, input_dir = args.output_dir, args.input_dir
    private_dir = args.private_dir or out_dir.with_name(out_dir.name + "_private")
    if private_dir.resolve() == out_dir.resolve() or out_dir.resolve() in private_dir.resolve().parents:
        raise SystemExit(f"--private-dir {private_dir} must not be inside {out_dir} (pushable)")

    source, _root, items = discover(input_dir, [out_dir, private_dir])
    try:
        key, key_source = load_key(cfg["key_file"], source == "synthetic",
                                   [input_dir, out_dir, private_dir])
    except DeidKeyError as err:
        log.error("%s", err)
        return 2
    keyring, options = Keyring(key), DeidOptions.from_params(cfg)
    prepare_output(out_dir)
    private_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s cohort, %d files, key from %s, options %s", source, len(items), key_source,
             options.codes())

    initargs = (options.as_dict(), key, cfg, out_dir)
    results = run_parallel(_deid_one, items, int(cfg["workers"]), _init_deid, initargs,
                           "anonymize", int(cfg["chunksize"]))
    results.sort(key=lambda r: r.rel)
    dedupe(results, items, initargs)
    evidence: dict[str, Evidence] = defaultdict(Evidence)
    for r in results:
        if r.patient:
            evidence[r.patient].update(r.evidence)
    extra: list[Path] = []
    if source == "luna16":
        image_results, extra = luna16_images(input_dir, out_dir, keyring, evidence)
        results += image_results
    written = [r for r in results if not r.reason]
    annotations, n_annotations = remap_annotations(input_dir, keyring, {r.series for r in written})
    write_csv(out_dir / "annotations.csv", annotations)
    info = table_info()
    meta = {"profile": "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile",
            "codes": options.codes(), "options": options.as_dict(), "cohort_source": source,
            "table": {k: info[k] for k in ("table", "version", "rows", "deid_profile_csv_sha256",
                                           "safe_private_rows", "sources")},
            "uid_scheme": "2.25.<int(HMAC-SHA256(key, uid)[:16])>", "key_source": key_source,
            "key_fingerprint": keyring.fingerprint(),
            **{k: cfg[k] for k in ("date_shift_days", "burned_in_missing_ok", "leak_min_chars")}}
    write_tables(out_dir, private_dir, results, keyring, options, meta)

    extra += [out_dir / name for name in OWN_FILES]
    leaks = verify(out_dir, written, evidence, extra, cfg)
    seconds = time.perf_counter() - start
    reasons = Counter(r.reason for r in results if r.reason)
    metrics = {
        "files_in": len(results), "files_out": len(written), "files_quarantined": sum(reasons.values()),
        "series_out": len({r.series for r in written}), "patients_out": len({r.patient for r in written}),
        "annotations_in": n_annotations, "annotations_out": len(annotations),
        "leaks_found": len(leaks), "seconds": seconds,
        "files_per_s": len(results) / seconds if seconds else 0.0,
        "quarantine_reasons": dict(sorted(reasons.items())),
    }
    write_json(args.metrics, rounded(metrics))
    log.info("%d in, %d out, %d quarantined %s, %.1f files/s", metrics["files_in"],
             metrics["files_out"], metrics["files_quarantined"], dict(reasons), metrics["files_per_s"])
    if leaks:
        write_csv(private_dir / "leaks.csv", pd.DataFrame(leaks, columns=["file", "finding"]))
        for rel in sorted({rel for rel, _ in leaks}):
            (out_dir / rel).unlink(missing_ok=True)
        log.error("%d identifying values survived in %d files (deleted; details in %s)",
                  len(leaks), len({rel for rel, _ in leaks}), private_dir / "leaks.csv")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
