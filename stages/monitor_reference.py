"""Stage monitor_reference: what the model was trained on, as drift monitoring compares it.

In:  ANONYMIZED_DIR (``data/anonymized``: the DICOM series in HU), PROCESSED_DIR
     (``data/processed``: ``index.json`` names each case's series and split), EVALUATE_DIR
     (``metrics/evaluate``: ``candidates.csv``, the test split's detections).
Out: OUT (``models/monitor_reference.json``): ``records``, the input features of every series of
     the splits ``monitor_reference.splits`` (train, val) with the definitions predict and serve
     record (``ctpipe.monitor.record.input_features``), and ``outputs``, the output features of
     every test series (candidates kept, best score, total volume): the reference of
     ``python -m ctpipe.monitor``. ``--metrics``: the series counted and the seconds taken.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pandas as pd
import pydicom

from ctpipe import config, dicomio
from ctpipe.fileio import read_json, write_json
from ctpipe.monitor.record import input_features, output_features
from ctpipe.params import setup_logging, stage_parser
from ctpipe.progress import progress
from ctpipe.runenv import record as record_environment

log = logging.getLogger("monitor_reference")


def series_folders(anonymized: Path) -> dict[str, Path]:
    return {p.name: p for p in (anonymized / "dicom").glob("*/*") if p.is_dir()}


def input_records(cases: list[dict], folders: dict[str, Path]) -> list[dict]:
    records = []
    for case in progress(cases, desc="reference", unit="series"):
        paths = sorted(folders[case["seriesuid"]].glob("*.dcm"))
        hu, geom = dicomio.read_series(paths)
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        records.append({"split": case["split"], **input_features(first, hu, geom.spacing)})
    return records


def output_records(cases: list[dict], candidates: pd.DataFrame) -> list[dict]:
    detected = candidates[candidates["detected"].astype(bool)]
    out = []
    for case in cases:
        rows = detected[detected["seriesuid"] == case["seriesuid"]]
        out.append({"split": "test", **output_features(rows, None)})
    for record in out:
        record.pop("inference_seconds", None)  # not comparable across machines
    return out


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "monitor_reference")
    parser.add_argument("anonymized_dir", type=Path, help="de-identified cohort (data/anonymized)")
    parser.add_argument("processed_dir", type=Path, help="preprocessed dataset (data/processed)")
    parser.add_argument("evaluate_dir", type=Path, help="evaluate's tables (metrics/evaluate)")
    parser.add_argument("out", type=Path, help="reference to write (models/monitor_reference.json)")
    args = parser.parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    record_environment("monitor_reference", args.metrics.parent / "env")
    cfg = config.load(args.params).monitor_reference
    cases = read_json(args.processed_dir / "index.json")["cases"]
    training = [c for c in cases if c["split"] in set(cfg.splits)]
    test = [c for c in cases if c["split"] == "test"]
    records = input_records(training, series_folders(args.anonymized_dir))
    outputs = output_records(test, pd.read_csv(args.evaluate_dir / "candidates.csv"))
    write_json(
        args.out,
        {
            "records": records,
            "outputs": outputs,
            "source": {"train_val_series": len(records), "test_series": len(outputs)},
        },
    )
    log.info("reference: %d train/val series, %d test outputs", len(records), len(outputs))
    write_json(
        args.metrics,
        {
            "train_val_series": len(records),
            "test_series": len(outputs),
            "seconds": round(time.perf_counter() - start, 2),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
