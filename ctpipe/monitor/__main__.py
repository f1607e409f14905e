"""``python -m ctpipe.monitor REFERENCE RECORDS [--out DIR] [--window N] [--alpha A]``

REFERENCE: the training reference (``models/monitor_reference.json``, stage monitor_reference: the
train + val series' input features and the test split's outputs). RECORDS: a folder of records
written by predict (``--records``) or serve (``records_dir``). The newest ``--window`` records are
compared; the report goes to ``--out`` (report.md, report.json, a PNG per drifting feature).
Exit status 0 when nothing drifts, 1 when a feature does, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ctpipe.monitor import drift, record, report


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m ctpipe.monitor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("reference", type=Path)
    parser.add_argument("records", type=Path)
    parser.add_argument("--out", type=Path, default=Path("monitor_report"))
    parser.add_argument("--window", type=int, default=200, help="newest records compared")
    parser.add_argument("--alpha", type=float, default=0.01, help="family-wise false alarm rate")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.reference.is_file() or not args.records.is_dir():
        print(
            f"{args.reference} must be a reference file and {args.records} a folder of records",
            file=sys.stderr,
        )
        return 2
    reference = record.load_reference(args.reference)
    window = record.load(args.records, newest=args.window)
    results = drift.compare(reference, window, args.alpha)
    summary = report.write(
        args.out,
        results,
        reference,
        window,
        {"reference": len(reference), "window": len(window), "alpha": args.alpha},
    )
    drifting = ", ".join(summary["drifting"]) or "none"
    print(f"{len(window)} records, {summary['features']} features; drifting: {drifting}")
    print(f"report: {args.out / 'report.md'}")
    return 1 if summary["drifting"] else 0


if __name__ == "__main__":
    sys.exit(main())
