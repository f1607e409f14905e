"""Stage ingest: bring a cohort in and account for every input file.

In:  ``ingest.source`` from params.yaml:
       synthetic  the built-in cohort, generated from ``ingest.synthetic`` and ``base.seed``
       dicom      a folder of DICOM studies (``ingest.source_dir``) + a LUNA16-style CSV
       luna16     a LUNA16-style folder of ``.mhd/.raw`` volumes + ``annotations.csv``
Out: ``OUT_DIR/`` (holds PHI: a ``push: false`` output)
       dicom/            accepted DICOM files (dicom and synthetic sources), original tree
       images/           accepted .mhd/.raw pairs (luna16 source)
       annotations.csv   seriesuid,coordX,coordY,coordZ,diameter_mm (world mm), and the nodule
                         kinds type,texture,margin,solid_fraction where known (ctpipe/annotations.py)
       manifest.csv      every input file: path, status (ok / skipped), reason, series, position
       cohort.json       the source and what was accepted
     ``metrics/ingest.json``: file, series and nodule counts.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from ctpipe import config, dicomio, listing, synth
from ctpipe.annotations import select as select_columns
from ctpipe.fileio import write_csv, write_json
from ctpipe.params import setup_logging, stage_parser
from ctpipe.progress import progress
from ctpipe.runenv import record as record_environment
from ctpipe.safepath import UnsafePath, inside, uid_component, uid_reason

log = logging.getLogger("ingest")
# UIDs a file must have to be accepted: anonymize names its output after them, preprocess its cases
UIDS = tuple(dicomio.UID_FIELDS)


def generate_synthetic(out: Path, cohort: synth.Cohort, seed: int, workers: int) -> pd.DataFrame:
    """Write the synthetic cohort's DICOM studies under ``out``; return its annotations."""
    job = partial(synth.write_case, out, seed, cohort=cohort)
    indices = range(cohort.n_patients)
    with ProcessPoolExecutor(workers) as pool:
        rows = list(
            progress(
                pool.map(job, indices), total=len(indices), desc="synthetic cohort", unit="patient"
            )
        )
    return synth.annotations_frame([r for case_rows in rows for r in case_rows])


def read_annotations(path: Path) -> pd.DataFrame:
    """A LUNA16-style annotations CSV, with the optional nodule kinds it has; a clear error if a
    required column is missing or a kind is not a short word (:func:`ctpipe.annotations.select`)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotations CSV not found (param ingest.annotations)")
    return select_columns(pd.read_csv(path), str(path))


def _resolved(path: Path) -> Path | None:
    """``path`` with links resolved; None for a link loop or a path that cannot be resolved."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a link loop (Python < 3.13)
        return None


def link_or_copy(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest`` without storing it twice: a hard link where ``src`` and ``dest``
    share a file system, a copy otherwise. Ingest never modifies what it accepts, and DVC makes
    its outputs read-only (linked cache), so the link and the input stay the same bytes."""
    try:
        os.link(src, dest)
    except OSError:  # another file system, links not allowed, or a link count at its limit
        shutil.copy2(src, dest)


def ingest_dicom(source: Path, out: Path, cfg: config.Ingest, workers: int) -> pd.DataFrame:
    """Scan ``source``, link or copy the accepted files to ``out`` (same relative paths). A file
    that cannot be copied (gone since the scan, unreadable) is skipped with the reason."""
    manifest = dicomio.scan_folder(source, workers, **_checks(cfg))
    annotations = Path(cfg.annotations or "").resolve()
    is_csv = manifest["path"].map(lambda rel: _resolved(source / rel) == annotations)
    manifest.loc[is_csv, ["status", "reason"]] = ["annotations", "the cohort's annotations CSV"]
    for i in manifest.index[manifest["status"] == "ok"]:
        rel = manifest.at[i, "path"]
        try:
            dest = inside(out, out / rel)
        except UnsafePath as err:
            manifest.loc[i, ["status", "reason"]] = ["skipped", str(err)]
            continue
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(source / rel, dest)
        except OSError as err:  # gone or unreadable since the scan: no half copy is kept
            dest.unlink(missing_ok=True)
            why = (err.strerror or type(err).__name__).lower()
            manifest.loc[i, ["status", "reason"]] = ["skipped", f"cannot be copied: {why}"]
    return manifest


def ingest_luna16(source: Path, out: Path) -> pd.DataFrame:
    """Check every .mhd/.raw pair under ``source``; link or copy the readable ones to ``out``. The
    file name is the series UID (it names the copy); the data file must lie inside ``source``."""
    files, unusable = listing.list_files(source)
    rows, paired = list(unusable), set()
    for mhd in (f for f in files if f.suffix == ".mhd"):
        rel = listing.display_path(mhd, source)
        uid = mhd.stem
        try:
            uid_component(uid)
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(mhd))
            reader.ReadImageInformation()
            name = next(
                line.split("=", 1)[1].strip()
                for line in mhd.read_text().splitlines()
                if line.startswith("ElementDataFile")
            )
            data = inside(source, mhd.parent / name)  # before anything reads it
            sitk.ReadImage(str(mhd))  # reads the pixels: catches a truncated .raw
            copies = [(data, inside(out, out / data.name)), (mhd, inside(out, out / f"{uid}.mhd"))]
            for src, dest in copies:
                link_or_copy(src, dest)
        except UnsafePath as exc:
            why = f"file name is not a series UID: {exc}" if uid_reason(uid) else str(exc)
            rows.append({"path": rel, "status": "skipped", "reason": why})
            continue
        except Exception as exc:
            rows.append(
                {"path": rel, "status": "skipped", "reason": f"unreadable MetaImage: {exc}"}
            )
            continue
        paired.add(data)
        rows.append(
            {"path": rel, "status": "ok", "reason": "", "series_uid": uid, "modality": "CT"}
        )
        rows.append(
            {
                "path": listing.display_path(data, source.resolve()),
                "status": "ok",
                "reason": f"pixel data of {rel}",
                "series_uid": uid,
                "modality": "CT",
            }
        )
    for other in (f for f in files if f.suffix != ".mhd"):
        if _resolved(other) not in paired and other.name != "annotations.csv":
            rows.append(
                {
                    "path": listing.display_path(other, source),
                    "status": "skipped",
                    "reason": "not part of a readable .mhd/.raw pair",
                }
            )
    return pd.DataFrame(rows, columns=dicomio.MANIFEST_COLUMNS)


def _checks(cfg: config.Ingest) -> dict:
    return {
        "modalities": tuple(cfg.modalities),
        "min_slices": cfg.min_slices,
        "spacing_tolerance": cfg.spacing_tolerance,
        "uneven": cfg.uneven_slices,
        "uids": UIDS,
    }


def run(cfg: config.Ingest, seed: int, workers: int, out: Path) -> dict:
    """Ingest the configured source into ``out`` with ``workers`` processes; return the stage
    metrics."""
    if out.exists():
        inside(out.parent, out)  # OUT_DIR such as data/raw/.. would take its parent with it
        shutil.rmtree(out)
    out.mkdir(parents=True)
    source = cfg.source
    if source == "synthetic":
        cohort = synth.Cohort.from_params(cfg.synthetic)
        annotations = generate_synthetic(out / "dicom", cohort, seed, workers)
        manifest = dicomio.scan_folder(out / "dicom", workers, **_checks(cfg))
        bad = manifest[manifest["status"] != "ok"]
        if len(bad):  # the generator writes clean data: anything else is a bug, not user data
            raise RuntimeError(f"synthetic cohort has rejected files, e.g. {bad.iloc[0].to_dict()}")
    elif source == "dicom":
        if cfg.annotations is None:
            raise ValueError("params.yaml ingest.annotations: the dicom source needs its CSV")
        manifest = ingest_dicom(Path(cfg.source_dir), out / "dicom", cfg, workers)
        annotations = read_annotations(Path(cfg.annotations))
    else:  # luna16 (config.Ingest admits no other source)
        (out / "images").mkdir()
        manifest = ingest_luna16(Path(cfg.source_dir), out / "images")
        annotations = read_annotations(Path(cfg.source_dir) / "annotations.csv")
    accepted = set(manifest.loc[manifest["status"] == "ok", "series_uid"])
    unmatched = annotations[~annotations["seriesuid"].isin(accepted)]
    if len(unmatched):
        log.warning(
            "%d annotation(s) name series that were not accepted; they are kept in "
            "annotations.csv and reported by preprocess",
            len(unmatched),
        )
    for _, row in manifest[manifest["status"] != "ok"].iterrows():
        log.warning("skipped %s: %s", row["path"], row["reason"])
    write_csv(out / "manifest.csv", manifest)
    write_csv(out / "annotations.csv", annotations)
    write_json(out / "cohort.json", {"source": source, "series": sorted(accepted)})
    return {
        "files": len(manifest),
        "files_ok": int((manifest["status"] == "ok").sum()),
        "files_skipped": int((manifest["status"] != "ok").sum()),
        "series_ok": len(accepted),
        "nodules": len(annotations),
        "annotations_unmatched": len(unmatched),
    }


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "ingest")
    parser.add_argument("out_dir", type=Path, help="raw cohort folder to write (data/raw)")
    args = parser.parse_args(argv)
    setup_logging()
    params = config.load(args.params)
    record_environment("ingest", Path(args.metrics).parent / "env")
    start = time.perf_counter()
    metrics = run(params.ingest, params.base.seed, params.base.workers, args.out_dir)
    write_json(args.metrics, metrics)  # no timings inside: metrics stay identical across re-runs
    log.info("ingest: %s in %.1f s", metrics, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
