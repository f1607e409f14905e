"""Stage preprocess: de-identified series -> resampled, cropped, normalised volumes with nodule masks.

In:  ``IN_DIR/`` from anonymize: ``dicom/`` (DICOM series) or ``images/`` (.mhd), ``annotations.csv``
Out: ``OUT_DIR/`` (layout in ``ctpipe/model/data.py``): ``cases/<id>.image.b2nd`` (float16) and
     ``cases/<id>.label.b2nd`` (uint8), compressed Blosc2 arrays; ``index.json`` (per case also
     sex, age band, scanner and slice thickness, no identity), ``nodules.csv`` (annotations.csv's
     columns, the nodule kinds included, plus ``inside``, ``voxels``, ``case_id``), ``plan.json``
     (fingerprint and plan), ``splits.json`` (patients per split, seeded, stratified by nodule
     presence; made first, so that the fingerprint and plan come from the train and val cases
     only);
     ``metrics/preprocess.json``: cases per split, target spacing, nodules outside their volume.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pandas as pd

from ctpipe import config, dicomio, prep
from ctpipe.fileio import write_csv, write_json
from ctpipe.params import setup_logging, stage_parser
from ctpipe.progress import progress
from ctpipe.runenv import record as record_environment
from ctpipe.volumes import case_files, write_volume

log = logging.getLogger("preprocess")


def discover(in_dir: Path, workers: int) -> list[dict]:
    """One source per series: kind, paths, seriesuid, patient_id; sorted by seriesuid."""
    sources = []
    if (in_dir / "dicom").is_dir():
        # ingest already chose the series (modality, slice count, uneven steps): accept them all.
        manifest = dicomio.scan_folder(
            in_dir / "dicom", workers, modalities=None, uneven="resample"
        )
        for _, row in manifest[manifest["status"] != "ok"].iterrows():
            log.warning("skipped %s: %s", row["path"], row["reason"])
        patients = manifest.drop_duplicates("series_uid").set_index("series_uid")["patient_id"]
        for uid, paths in dicomio.series_files(manifest).items():
            sources.append(
                {
                    "kind": "dicom",
                    "seriesuid": uid,
                    "patient_id": patients[uid] or uid,
                    "paths": [str(in_dir / "dicom" / p) for p in paths],
                }
            )
    for mhd in sorted((in_dir / "images").glob("*.mhd")) if (in_dir / "images").is_dir() else []:
        sources.append(
            {"kind": "mhd", "seriesuid": mhd.stem, "patient_id": mhd.stem, "path": str(mhd)}
        )
    sources.sort(key=lambda s: s["seriesuid"])
    for i, src in enumerate(sources):
        src["index"], src["case_id"] = i, f"case_{i:03d}"
    if not sources:
        raise FileNotFoundError(
            f"{in_dir}: no DICOM series (dicom/) or MetaImages (images/) to preprocess"
        )
    return sources


def _write_case(source: dict, per_case: dict, plan: dict, out: Path) -> dict:
    """Worker: process one case, write its arrays, return its index entry and nodule report."""
    result = prep.process_case(source, per_case[source["seriesuid"]], plan)
    image_file, label_file = case_files(out, source["case_id"])
    write_volume(image_file, result["image"])
    write_volume(label_file, result["label"])
    report = result["nodules"].assign(case_id=source["case_id"])
    entry = {
        "case_id": source["case_id"],
        "seriesuid": source["seriesuid"],
        "patient_id": source["patient_id"],
        "shape": list(result["image"].shape),
        "geometry": result["geometry"].to_dict(),
        "nodules": int(len(report)),
        "foreground_voxels": int(result["label"].sum()),
        **result["attributes"],  # sex, age band, scanner, slice thickness: evaluate's subgroups
    }
    return {"entry": entry, "nodules": report}


def _pmap(fn, items, workers: int, desc: str) -> list:
    if workers > 1 and len(items) > 1:
        with ProcessPoolExecutor(workers) as pool:
            return list(progress(pool.map(fn, items), total=len(items), desc=desc, unit="case"))
    return [fn(item) for item in progress(items, desc=desc, unit="case")]


def split_cohort(
    sources: list[dict], per_case: dict, cfg: config.Split, seed: int
) -> tuple[dict, dict]:
    """The patient split (train / val / test) and the split of each patient.

    The split comes first, from the annotations alone, so that the fingerprint and the plan are
    made from the training cases (train + val) only: nothing of the test split shapes
    preprocessing (nnU-Net fingerprints its training cases).
    """
    counts = pd.DataFrame(
        {
            "patient_id": [s["patient_id"] for s in sources],
            "nodules": [len(per_case[s["seriesuid"]]) for s in sources],
        }
    )
    patients = counts.groupby("patient_id", sort=True)["nodules"].sum().gt(0)
    splits = prep.split_patients(patients.rename("has_nodules").reset_index(), cfg, seed)
    return splits, {p: name for name in ("train", "val", "test") for p in splits[name]}


def warn_outside(nodules: pd.DataFrame) -> pd.DataFrame:
    """Log and return the annotated nodules whose centre lies outside their volume."""
    outside = nodules[~nodules["inside"]] if len(nodules) else nodules
    for _, row in outside.iterrows():
        log.warning(
            "nodule at (%.1f, %.1f, %.1f) mm lies outside the volume of %s: not in its mask",
            row["coordX"],
            row["coordY"],
            row["coordZ"],
            row["case_id"],
        )
    return outside


def run(cfg: config.Preprocess, seed: int, workers: int, in_dir: Path, out: Path) -> dict:
    """Preprocess every series of ``in_dir`` into ``out`` with ``workers`` processes; return the
    stage metrics."""
    sources = discover(in_dir, workers)
    annotations = pd.read_csv(in_dir / "annotations.csv")
    per_case = {
        s["seriesuid"]: annotations[annotations["seriesuid"] == s["seriesuid"]] for s in sources
    }
    orphans = annotations[~annotations["seriesuid"].isin(per_case)]
    for _, row in orphans.iterrows():
        log.warning("annotation for series %s: no such series in the cohort", row["seriesuid"])
    splits, split_of = split_cohort(sources, per_case, cfg.split, seed)
    fitted = [s for s in sources if split_of[s["patient_id"]] != "test"]
    fingerprint = partial(_fingerprint, cfg=cfg, seed=seed, per_case=per_case)
    plan = prep.make_plan(_pmap(fingerprint, fitted, workers, "fingerprint"), cfg)
    plan["fingerprint"]["splits"] = ["train", "val"]
    log.info(
        "plan from %d train+val cases: target spacing %s mm, normalisation %s",
        len(fitted),
        plan["target_spacing_mm"],
        plan["normalization"],
    )

    if out.exists():
        shutil.rmtree(out)
    (out / "cases").mkdir(parents=True)
    job = partial(_write_case, per_case=per_case, plan=plan, out=out)
    results = _pmap(job, sources, workers, "preprocess")
    entries = [r["entry"] for r in results]
    nodules = pd.concat([r["nodules"] for r in results], ignore_index=True)
    outside = warn_outside(nodules)
    for entry in entries:
        entry["split"] = split_of[entry["patient_id"]]

    write_json(out / "index.json", {"cases": entries})
    write_json(out / "plan.json", plan)
    write_json(out / "splits.json", splits)
    write_csv(out / "nodules.csv", nodules)
    counts = pd.Series([e["split"] for e in entries]).value_counts()
    return {
        "cases": len(entries),
        **{f"cases_{s}": int(counts.get(s, 0)) for s in ("train", "val", "test")},
        "nodules": int(len(nodules)),
        "nodules_outside_volume": int(len(outside)),
        "annotations_without_series": int(len(orphans)),
        "target_spacing_mm": plan["target_spacing_mm"],
        "normalization": plan["normalization"],
        "fingerprint": plan["fingerprint"],
    }


def _fingerprint(source: dict, cfg: config.Preprocess, seed: int, per_case: dict) -> dict:
    return prep.fingerprint_case(source, per_case[source["seriesuid"]], cfg, seed)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__, "preprocess")
    parser.add_argument("in_dir", type=Path, help="de-identified cohort (data/anonymized)")
    parser.add_argument("out_dir", type=Path, help="preprocessed dataset to write (data/processed)")
    args = parser.parse_args(argv)
    setup_logging()
    params = config.load(args.params)
    record_environment("preprocess", Path(args.metrics).parent / "env")
    start = time.perf_counter()
    metrics = run(
        params.preprocess, params.base.seed, params.base.workers, args.in_dir, args.out_dir
    )
    write_json(args.metrics, metrics)
    log.info("preprocess: %d cases in %.1f s", metrics["cases"], time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
