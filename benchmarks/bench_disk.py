"""Bytes on disk after ``make repro`` per byte of input, against DVC's default of copies.

Walks the pipeline's data (``data/``), models (``models/``) and the DVC cache (``.dvc/cache``) of a
repository where ``make repro`` has run and prints, per folder, the file bytes (apparent sizes) and
the allocated bytes (what ``du`` reports: whole blocks), a file reached through several hard links
counted once, as the disk holds it. The input is ``data/raw`` (for the default cohort, the files
the ingest stage generated; for a user's folder, the files it links). Beside it, the same tree as
DVC stores it with its default ``cache.type: copy`` and no relink: every workspace file and its
cache entry counted apart. Issue 36's target: at most 2.5 x the input. Usage::

    python benchmarks/bench_disk.py [--root .] [--out metrics/bench_disk.json]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ctpipe.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("data/raw", "data/anonymized", "data/processed", "data", "models", ".dvc/cache")
MB = 1e6


def walk(root: Path, seen: set[tuple[int, int]], skip: set[Path]) -> dict[str, int]:
    """Bytes of the regular files under ``root`` (but not under ``skip``) not already in ``seen``
    (inodes: hard links count once), and of every such file counted apart (``copies``); symbolic
    links are not followed."""
    out = {"apparent": 0, "allocated": 0, "copies": 0, "files": 0}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) not in skip]
        for name in names:
            st = os.lstat(os.path.join(folder, name))
            if not os.path.stat.S_ISREG(st.st_mode):
                continue
            out["copies"] += st.st_size
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            out["apparent"] += st.st_size
            out["allocated"] += st.st_blocks * 512
            out["files"] += 1
    return out


def measure(root: Path) -> dict:
    """Per folder of :data:`FOLDERS` (``data`` is what the three before it leave), then totals."""
    seen: set[tuple[int, int]] = set()
    walked = {root / name for name in FOLDERS}
    rows = {name: walk(root / name, seen, walked) for name in FOLDERS if (root / name).exists()}
    if "data/raw" not in rows:
        raise SystemExit(f"{root / 'data/raw'}: no input; run make repro first")
    total = {k: sum(r[k] for r in rows.values()) for k in ("apparent", "allocated", "copies")}
    raw = rows["data/raw"]
    return {
        "folders": rows,
        "total": total,
        "input": {k: raw[k] for k in ("apparent", "allocated")},
        "ratio": {
            "apparent": total["apparent"] / raw["apparent"],
            "allocated": total["allocated"] / raw["allocated"],
            "copies": total["copies"] / raw["apparent"],
        },
    }


def report(figures: dict) -> None:
    print(f"{'':18s} {'file MB':>9s} {'on disk MB':>11s} {'files':>7s} {'as copies MB':>13s}")
    for name, row in figures["folders"].items():
        label = "data (the rest)" if name == "data" else name
        print(
            f"{label:18s} {row['apparent'] / MB:9.1f} {row['allocated'] / MB:11.1f} "
            f"{row['files']:7d} {row['copies'] / MB:13.1f}"
        )
    total, ratio = figures["total"], figures["ratio"]
    print(
        f"{'total':18s} {total['apparent'] / MB:9.1f} {total['allocated'] / MB:11.1f} "
        f"{'':7s} {total['copies'] / MB:13.1f}"
    )
    print(
        f"per byte of input: {ratio['apparent']:.2f} x (file bytes), {ratio['allocated']:.2f} x "
        f"(allocated); DVC's default copies: {ratio['copies']:.2f} x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository (default: this one)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    figures = measure(args.root.resolve())
    report(figures)
    if args.out:
        write_json(args.out, figures)


if __name__ == "__main__":
    main()
