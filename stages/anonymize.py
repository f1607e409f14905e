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

import sys
from pathlib import Path

from ctpipe import config, prefork
from ctpipe.params import setup_logging, stage_parser
from ctpipe.runenv import record as record_environment


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
    # The other workers first, before the de-identification modules are imported here: forked
    # later, they would share (and copy page by page) this process's heap.
    started = prefork.start(params.base.workers - 1, "ctpipe.deid.stage", "worker_ready")
    try:
        from ctpipe.deid import stage

        return stage.run(
            args.input_dir,
            out_dir,
            private_dir,
            args.metrics,
            params.anonymize,
            params.base.workers,
            started,
        )
    finally:
        if started is not None:  # reaped here: the run closed their pool, or terminated it
            started.stop()
        # afterwards: it imports torch, which would make the workers' start slow
        record_environment("anonymize", args.metrics.parent / "env")


if __name__ == "__main__":
    sys.exit(main())
