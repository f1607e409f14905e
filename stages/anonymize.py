"""Stage anonymize: the boundary PHI never crosses (DICOM PS3.15 Annex E, Basic Profile + options).

In:  INPUT_DIR (``data/raw`` from ingest): ``dicom/**`` (any tree of DICOM files; names may carry
     PHI), ``annotations.csv`` (seriesuid,coordX,coordY,coordZ,diameter_mm and the optional
     nodule kinds of ``ctpipe/annotations.py``; any other column is dropped), ``cohort.json``
     (``{"source": "synthetic" | "dicom" | "luna16"}``); for luna16 ``images/*.mhd`` + data files.
     A folder with neither ``dicom/`` nor ``cohort.json`` is read as a plain folder of DICOM files
     (a real cohort: a key is required; no annotations).
Out: OUTPUT_DIR (pushable, no PHI): ``dicom/<Study UID>/<Series UID>/<SOP UID>.dcm``,
     ``annotations.csv`` (seriesuid remapped), ``images/`` (luna16), ``audit.csv`` (actions per
     output file), ``quarantine.csv`` (keyed hash of the input path + reason),
     ``deid_options.json`` (profile, options, table version; no secret).
     ``--private-dir`` (``push: false``): ``quarantine.csv`` with the original paths and details,
     ``linkage.csv`` (original -> pseudonym) when ``keep_linkage``, ``leaks.csv`` on failure.
     ``--metrics``: files in/out/quarantined, series, patients, leaks_found, seconds (wall and
     CPU, workers included: the work, without start-up and the environment record), files/s.
Secret: ``CTPIPE_DEID_KEY``, else ``anonymize.key_file``; only the synthetic cohort may fall back
to the public demo key. After writing, every output (values at every depth, file names, CSVs) is
scanned for the identifying values found in the input (``ctpipe.deid.verify``): any survivor
fails the stage and its file is deleted.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

from ctpipe import config
from ctpipe.deid import batch, cohort
from ctpipe.deid.batch import DeidJob, Verification, Workers
from ctpipe.deid.files import FileResult
from ctpipe.deid.keys import DeidKeyError, Keyring, load_key
from ctpipe.deid.table import DeidOptions
from ctpipe.deid.verify import Evidence
from ctpipe.fileio import rounded, write_csv, write_json
from ctpipe.params import setup_logging, stage_parser
from ctpipe.runenv import record as record_environment

log = logging.getLogger("anonymize")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "anonymize")
    parser.add_argument("input_dir", type=Path, help="raw cohort (data/raw), holds PHI")
    parser.add_argument("output_dir", type=Path, help="de-identified cohort (data/anonymized)")
    parser.add_argument(
        "--private-dir",
        type=Path,
        default=None,
        help="push: false folder for original paths and linkage (default: OUTPUT_DIR + '_private')",
    )
    args = parser.parse_args(argv)
    setup_logging()
    params = config.load(args.params)
    out_dir = args.output_dir
    private_dir = args.private_dir or out_dir.with_name(out_dir.name + "_private")
    if (
        private_dir.resolve() == out_dir.resolve()
        or out_dir.resolve() in private_dir.resolve().parents
    ):
        raise SystemExit(f"--private-dir {private_dir} must not be inside {out_dir} (pushable)")
    try:
        return run(
            args.input_dir,
            out_dir,
            private_dir,
            args.metrics,
            params.anonymize,
            params.base.workers,
        )
    finally:  # afterwards: it imports torch, which would make the workers' start slow
        record_environment("anonymize", args.metrics.parent / "env")


def run(
    input_dir: Path,
    out_dir: Path,
    private_dir: Path,
    metrics_path: Path,
    cfg: config.Anonymize,
    workers: int,
) -> int:
    """The stage's work with ``workers`` processes; its exit code."""
    start = time.perf_counter(), cohort.cpu_seconds()
    try:
        source, items, unusable = cohort.discover(input_dir, [out_dir, private_dir])
        raw_annotations = cohort.load_annotations(input_dir, source)
        key, key_source = load_key(
            cfg.key_file, source == "synthetic", [input_dir, out_dir, private_dir]
        )
    except (DeidKeyError, cohort.InputError) as err:
        log.error("%s", err)
        return 2
    keyring, options = Keyring(key), DeidOptions.from_params(cfg)
    cohort.prepare_output(out_dir)
    private_dir.mkdir(parents=True, exist_ok=True)
    codes = options.codes()
    log.info("%s cohort, %d files, key from %s, options %s", source, len(items), key_source, codes)

    job = DeidJob.from_params(options, key, cfg, out_dir)
    with Workers(workers) as pool:
        results, evidence, extra, names = deidentify(items, job, pool, source, input_dir, keyring)
        results += unusable
        written = [r for r in results if not r.reason]
        gate = Verification(out_dir, written, evidence, options, names, pool)  # scans begin
        annotations, n_annotations = cohort.remap_annotations(
            raw_annotations, keyring, {r.series for r in written}
        )
        write_csv(out_dir / "annotations.csv", annotations)
        meta = cohort.deid_meta(options, source, keyring, key_source, cfg)
        cohort.write_tables(out_dir, private_dir, results, keyring, options, meta)
        leaks = gate.leaks(extra + [out_dir / name for name in cohort.OWN_FILES])
    metrics = cohort.run_metrics(results, written, n_annotations, annotations, leaks, start)
    write_json(metrics_path, rounded(metrics))
    log.info(
        "%(files_in)d in, %(files_out)d out, %(files_quarantined)d quarantined %(quarantine_reasons)s, "
        "%(files_per_s).1f files/s",
        metrics,
    )
    if leaks:
        cohort.remove_leaking(leaks, out_dir, private_dir)
        return 1
    return 0


def deidentify(
    items: list[tuple[str, str]],
    job: DeidJob,
    pool: Workers,
    source: str,
    input_dir: Path,
    keyring: Keyring,
) -> tuple[list[FileResult], dict[str, Evidence], list[Path], frozenset[str]]:
    """Every input file de-identified (by the ``pool``'s workers), sorted by input path; the
    identifying values found per patient (for the leak gate); for luna16 the image files too;
    the cohort's person-name components."""
    results, names = batch.deidentify(items, job, pool)
    evidence: dict[str, Evidence] = defaultdict(Evidence)
    for r in results:
        if r.patient:
            evidence[r.patient].update(r.evidence)
    extra: list[Path] = []
    if source == "luna16":
        image_results, extra = cohort.luna16_images(input_dir, job.out_dir, keyring, evidence)
        results += image_results
    return results, evidence, extra, names


if __name__ == "__main__":
    sys.exit(main())
