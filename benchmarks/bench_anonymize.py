"""Throughput of the anonymize stage against dicognito on the same files, in one run.

Builds a synthetic cohort (realistic PHI in every place a hospital export has it) plus every
readable DICOM file that ships with pydicom, then times, end to end (read, de-identify, write):

- dicognito 0.19 (``Anonymizer.anonymize`` + ``save_as``), one process: its usual use;
- this stage (``stages/anonymize.py``'s ``main``: gating, de-identification, writing, the audit
  and the leak verification that re-reads every output) with 1 worker, then with all cores.

Prints files/s for each and the ratios: wall clock, and CPU time of the one process (a fair
one-core figure on a machine whose cores other jobs share). Usage::

    python benchmarks/bench_anonymize.py [--patients 12] [--matrix 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml
from dicognito.anonymizer import Anonymizer
from pydicom import dcmread
from pydicom.data import get_testdata_files

from ctpipe import synth
from ctpipe.fileio import write_csv, write_json

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_anonymize")
COHORT = {
    "pixel_spacing_mm": [1.6, 2.2],
    "slice_spacing_mm": [2.5],
    "z_extent_mm": 80,
    "oblique_degrees": 0,
    "vessels_per_lung": 1,
    "fraction_without_nodules": 0.0,
    "max_nodules": 2,
    "diameter_mm": [5, 20],
    "part_solid_fraction": 0.25,
    "blur_voxels": 0.6,
    "noise_hu": 20,
}
PARAMS = {
    "key_file": "",
    "workers": 1,
    "chunksize": 16,
    "retain_modified_dates": True,
    "retain_patient_characteristics": True,
    "clean_descriptors": True,
    "retain_device_identity": False,
    "retain_safe_private": False,
    "keep_linkage": False,
    "date_shift_days": [-3650, -365],
    "burned_in_missing_ok": ["CT", "MR", "PT", "NM", "RTDOSE", "SEG"],
    "leak_min_chars": 4,
}


def build_inputs(root: Path, patients: int, matrix: int) -> list[Path]:
    """Synthetic studies + pydicom's test files (those dicognito can read) under root/dicom."""
    rows = []
    for index in range(patients):
        rows += synth.write_case(
            root / "dicom" / "synthetic", 7, index, {**COHORT, "matrix": matrix}
        )
    write_csv(root / "annotations.csv", synth.annotations_frame(rows))
    write_json(root / "cohort.json", {"source": "synthetic"})
    for i, path in enumerate(p for p in map(Path, get_testdata_files()) if p.is_file()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path)
            if "SOPInstanceUID" in ds and "PixelData" in ds and ds.get("Modality") in ("CT", "MR"):
                shutil.copyfile(path, root / "dicom" / f"pydicom_{i:03d}.dcm")
        except Exception as err:  # noqa: BLE001 - unreadable test files are simply not in the set
            log.debug("not in the benchmark set: %s (%s)", path.name, err)
    return sorted(p for p in (root / "dicom").rglob("*") if p.is_file())


def run_dicognito(files: list[Path], out: Path) -> tuple[float, float]:
    """dicognito over ``files`` in this process; returns (wall, CPU) seconds."""
    anonymizer = Anonymizer(seed="bench")
    out.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, path in enumerate(files):
            ds = dcmread(path)
            anonymizer.anonymize(ds)
            ds.save_as(out / f"{i}.dcm")
    return time.perf_counter() - start, time.process_time() - cpu


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_stage(inputs: Path, out: Path, workers: int, tmp: Path) -> tuple[float, float, dict]:
    """The stage as a user runs it (its own process) with ``workers`` workers; returns wall and CPU
    seconds (of the stage and its worker processes) and its metrics."""
    params = tmp / f"params_{workers}.yaml"
    params.write_text(
        yaml.safe_dump({"base": {"seed": 7}, "anonymize": {**PARAMS, "workers": workers}})
    )
    metrics = tmp / f"metrics_{workers}.json"
    shutil.rmtree(out, ignore_errors=True)
    before, start = _children_cpu(), time.perf_counter()
    code = subprocess.run(
        [
            sys.executable,
            str(ROOT / "stages" / "anonymize.py"),
            str(inputs),
            str(out),
            "--private-dir",
            str(out) + "_private",
            "--params",
            str(params),
            "--metrics",
            str(metrics),
        ],
        cwd=ROOT,
    ).returncode
    seconds, cpu = time.perf_counter() - start, _children_cpu() - before
    if code != 0:
        raise SystemExit(f"anonymize stage failed with exit code {code}")
    return seconds, cpu, yaml.safe_load(metrics.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="best of N timings per tool")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.pop("CTPIPE_DEID_KEY", None)  # the synthetic cohort runs on the demo key
    with tempfile.TemporaryDirectory(prefix="bench_anonymize_") as tmp_name:
        tmp = Path(tmp_name)
        files = build_inputs(tmp / "raw", args.patients, args.matrix)
        n = len(files)
        print(
            f"{n} files ({args.patients} synthetic CT studies of {args.matrix}^2 slices "
            f"+ pydicom CT/MR test files), {os.cpu_count()} cores"
        )
        import anonymize  # noqa: F401 - import time is not throughput

        runs = [run_dicognito(files, tmp / "dicognito") for _ in range(args.repeat)]
        dicognito_wall, dicognito_cpu = min(r[0] for r in runs), min(r[1] for r in runs)
        ones = [run_stage(tmp / "raw", tmp / "out1", 1, tmp) for _ in range(args.repeat)]
        one_wall, one_cpu, metrics = min(r[0] for r in ones), min(r[1] for r in ones), ones[0][2]
        cores = max(1, os.cpu_count() or 1)
        many_wall = min(
            run_stage(tmp / "raw", tmp / "outn", cores, tmp)[0] for _ in range(args.repeat)
        )
        print(f"{'':26s} {'wall files/s':>13s} {'CPU files/s':>12s}")
        print(f"{'dicognito (1 process)':26s} {n / dicognito_wall:13.1f} {n / dicognito_cpu:12.1f}")
        print(f"{'ctpipe (1 worker)':26s} {n / one_wall:13.1f} {n / one_cpu:12.1f}")
        print(f"{f'ctpipe ({cores} workers)':26s} {n / many_wall:13.1f} {'':>12s}")
        print(
            f"ratio 1 worker / dicognito:  {dicognito_wall / one_wall:.2f}x wall, "
            f"{dicognito_cpu / one_cpu:.2f}x CPU (one core)"
        )
        print(f"ratio {cores} workers / dicognito: {dicognito_wall / many_wall:.2f}x wall")
        print(
            f"stage: {metrics['files_out']} written, {metrics['files_quarantined']} quarantined, "
            f"leaks_found={metrics['leaks_found']}"
        )
        print(
            "(ctpipe times include gating, audit and re-reading every output for the leak scan;"
            " dicognito's do not)"
        )


if __name__ == "__main__":
    main()
