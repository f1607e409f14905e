"""The anonymize stage's work (``stages/anonymize.py`` parses the command line and starts the
worker processes before this module's imports: :mod:`ctpipe.prefork`)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

from ctpipe import config, prefork
from ctpipe.deid import batch, cohort, table
from ctpipe.deid.batch import DeidJob, Verification, Workers
from ctpipe.deid.files import FileResult
from ctpipe.deid.keys import DeidKeyError, Keyring, load_key
from ctpipe.deid.table import DeidOptions
from ctpipe.deid.verify import Evidence, NeedleIndex, build_indexes, updated_indexes
from ctpipe.fileio import rounded, write_csv, write_json
from ctpipe.prefork import Started

log = logging.getLogger("anonymize")
Indexes = tuple[dict[str, NeedleIndex], NeedleIndex]  # per patient, across patients


def worker_ready() -> None:
    """A started worker's preparation (:func:`ctpipe.prefork.start`), once it has imported what
    this process imports: pydicom's value warnings off, the action tables read (static data, as
    the modules are; 2 ms a worker would otherwise spend on its first file)."""
    batch.quiet_pydicom()
    table.table_rows()
    table.safe_private()


def run(
    input_dir: Path,
    out_dir: Path,
    private_dir: Path,
    metrics_path: Path,
    cfg: config.Anonymize,
    workers: int,
    started: Started | None = None,
) -> int:
    """The stage's work with ``workers`` processes (``started``: those beside this one, started
    already); its exit code."""
    # the workers' start counts as the work's (not their imports: start-up, as this process's)
    spent = (started.seconds, started.cpu) if started else (0.0, 0.0)
    start = time.perf_counter() - spent[0], prefork.cpu_seconds() - spent[1]
    try:
        with Workers(workers, started=started) as pool:
            try:
                source = cohort.cohort_source(input_dir)
                # listed by a worker while this process reads the annotations
                listed = pool.call(cohort.discover, input_dir, source, [out_dir, private_dir])
                raw_annotations = cohort.load_annotations(input_dir, source)
                items, unusable = listed()
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
            log.info(
                "%s cohort, %d files, key from %s, options %s",
                source,
                len(items),
                key_source,
                codes,
            )
            job = DeidJob.from_params(options, key, cfg, out_dir)
            results, indexes, extra, names = deidentify(
                items, job, pool, source, input_dir, keyring
            )
            results += unusable
            written = [r for r in results if not r.reason]
            gate = Verification(out_dir, written, indexes, options, names, pool)  # scans begin
            annotations, n_annotations = cohort.remap_annotations(
                raw_annotations, keyring, {r.series for r in written}
            )
            write_csv(out_dir / "annotations.csv", annotations)
            meta = cohort.deid_meta(options, source, keyring, key_source, cfg)
            cohort.write_tables(out_dir, private_dir, results, keyring, options, meta)
            leaks = gate.leaks(extra + [out_dir / name for name in cohort.OWN_FILES])
    except batch.WorkerDied as err:
        # the pool is terminated by now: nothing writes into OUTPUT_DIR while it is emptied of
        # what no leak scan has read
        log.error("%s: the run stopped and %s was emptied; run the stage again", err, out_dir)
        cohort.prepare_output(out_dir)
        return 1
    start = start[0], start[1] - pool.worker_cpu()
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
) -> tuple[list[FileResult], Indexes, list[Path], frozenset[str]]:
    """Every input file de-identified (by the ``pool``'s workers), sorted by input path; the leak
    gate's indexes of the identifying values found per patient; for luna16 the image files too;
    the cohort's person-name components."""
    first, names, final = batch.deidentify(items, job, pool)
    image_results: list[FileResult] = []
    extra: list[Path] = []
    image_evidence: dict[str, Evidence] = defaultdict(Evidence)
    if source == "luna16":
        image_results, extra = cohort.luna16_images(input_dir, job.out_dir, keyring, image_evidence)
    evidence = merged(first, image_evidence)
    indexes = build_indexes(evidence, batch.LEAK_MIN_CHARS)  # while a worker de-identifies again
    results = final()
    if results is not first:  # the files de-identified again may have changed the evidence
        final_evidence = merged(results, image_evidence)
        indexes = updated_indexes(indexes, evidence, final_evidence, batch.LEAK_MIN_CHARS)
    return results + image_results, indexes, extra, names


def merged(results: list[FileResult], extra: dict[str, Evidence]) -> dict[str, Evidence]:
    """The identifying values found per patient, over every file and ``extra``."""
    evidence: dict[str, Evidence] = defaultdict(Evidence)
    for r in results:
        if r.patient:
            evidence[r.patient].update(r.evidence)
    for patient, found in extra.items():
        evidence[patient].update(found)
    return dict(evidence)
