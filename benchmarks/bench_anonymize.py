"""Throughput of the anonymize stage against dicognito on the same files, in one run.

Builds a synthetic cohort (realistic PHI in every place a hospital export has it) plus every
readable DICOM file that ships with pydicom, then times, end to end (read, de-identify, write):

- dicognito 0.19 (``Anonymizer.anonymize`` + ``save_as``), in this process: its usual use;
- this stage (``python stages/anonymize.py``, the way DVC runs it: gating, de-identification,
  writing, the audit and the leak gate that re-reads every output) with 1 worker, then with
  ``--workers`` (default: the CPUs this process may use), each in a process of its own with the
  params of ``params.yaml``.

The rates are files per second of the work: dicognito's loop; the stage's ``seconds`` and
``cpu_seconds`` (its metrics: after interpreter start-up, imports and the environment record,
worker processes included), so that neither tool's start-up counts. The stage's whole process
time is printed apart. Runs alternate between the tools and the best of ``--repeat`` is kept (a
machine whose cores other jobs share). Printed: the one-core ratio (CPU files/s of 1 worker over
dicognito's) and the scaling of the workers (wall files/s over 1 worker's; also from the median
runs, the figure less sensitive to one lucky or unlucky run). Usage::

    python benchmarks/bench_anonymize.py [--patients 12] [--matrix 128] [--repeat 5] [--workers N]
        [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median

import yaml
from dicognito.anonymizer import Anonymizer
from pydicom import dcmread
from pydicom.data import get_testdata_files

from ctpipe import synth
from ctpipe.fileio import write_csv, write_json

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_anonymize")
COHORT = synth.Cohort(
    slice_spacing_mm=(2.5,),
    z_extent_mm=80,
    vessels_per_lung=1,
    fraction_without_nodules=0.0,
    max_nodules=2,
    diameter_mm=(5, 20),
)


def build_inputs(root: Path, patients: int, matrix: int) -> list[Path]:
    """Synthetic studies + pydicom's test files (those dicognito can read) under root/dicom."""
    rows = []
    for index in range(patients):
        rows += synth.write_case(root / "dicom" / "synthetic", 7, index, COHORT.but(matrix=matrix))
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
    """dicognito over ``files`` in this process, into an empty ``out`` (new files, as the
    stage's); returns (wall, CPU) seconds."""
    anonymizer = Anonymizer(seed="bench")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, path in enumerate(files):
            ds = dcmread(path)
            anonymizer.anonymize(ds)
            ds.save_as(out / f"{i}.dcm")
    return time.perf_counter() - start, time.process_time() - cpu


def run_stage(inputs: Path, out: Path, workers: int, tmp: Path) -> dict:
    """The stage as DVC runs it (a process of its own) with ``workers`` workers: its metrics
    (``seconds`` and ``cpu_seconds`` of the work) and the process's wall seconds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["anonymize"]["key_file"] = ""
    params["base"]["workers"] = workers
    path = tmp / f"params_{workers}.yaml"
    path.write_text(yaml.safe_dump(params))
    metrics = tmp / f"metrics_{workers}.json"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}_private", ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "stages/anonymize.py", inputs, out, "--private-dir", f"{out}_private"]
        + ["--params", path, "--metrics", metrics],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"anonymize stage failed with exit code {done.returncode}")
    return {**json.loads(metrics.read_text()), "process_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--matrix", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5, help="best of N timings per tool")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--workdir", type=Path, default=None, help="for the files (default: TMPDIR)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.pop("CTPIPE_DEID_KEY", None)  # the synthetic cohort runs on the demo key
    with tempfile.TemporaryDirectory(prefix="bench_anonymize_", dir=args.workdir) as tmp_name:
        tmp = Path(tmp_name)
        files = build_inputs(tmp / "raw", args.patients, args.matrix)
        n = len(files)
        print(
            f"{n} files ({args.patients} synthetic CT studies of {args.matrix}^2 slices "
            f"+ pydicom CT/MR test files), {len(os.sched_getaffinity(0))} CPUs, files in {tmp}"
        )
        dicognito, one, many = [], [], []
        for _ in range(args.repeat):  # alternating, so that both tools see the same machine
            dicognito.append(run_dicognito(files, tmp / "dicognito"))
            one.append(run_stage(tmp / "raw", tmp / "out1", 1, tmp))
            many.append(run_stage(tmp / "raw", tmp / "outn", args.workers, tmp))
        report(n, args.workers, dicognito, one, many)


def report(n: int, workers: int, dicognito: list, one: list[dict], many: list[dict]) -> None:
    """The table: best wall and CPU rates of each tool, the ratios, the stage's start-up."""
    d_wall, d_cpu = min(r[0] for r in dicognito), min(r[1] for r in dicognito)
    rows = [
        ("dicognito 0.19 (1 process)", d_wall, d_cpu, None),
        ("ctpipe anonymize (1 worker)", *best(one)),
        (f"ctpipe anonymize ({workers} workers)", *best(many)),
    ]
    print(f"{'':32s} {'wall files/s':>13s} {'CPU files/s':>12s} {'process s':>10s}")
    for name, wall, cpu, process in rows:
        total = f"{process:10.2f}" if process is not None else ""
        print(f"{name:32s} {n / wall:13.1f} {n / cpu:12.1f} {total:>10s}")
    print(f"one core: ctpipe 1 worker / dicognito = {d_cpu / rows[1][2]:.2f}x (CPU files/s)")
    middle = median(r["seconds"] for r in one) / median(r["seconds"] for r in many)
    print(
        f"{workers} workers / 1 worker = {rows[1][1] / rows[2][1]:.2f}x (wall files/s; "
        f"{middle:.2f}x of the medians)"
    )
    print(f"{workers} workers / dicognito = {d_wall / rows[2][1]:.2f}x (wall files/s)")
    print(
        f"stage: {one[0]['files_out']} written, {one[0]['files_quarantined']} quarantined, "
        f"leaks_found={one[0]['leaks_found']}; start-up (interpreter, imports, environment "
        f"record) {rows[1][3] - rows[1][1]:.2f} s of the 1-worker process, not in the rates"
    )
    print(
        "(ctpipe's figures include gating, the audit and re-reading every output for the leak"
        " gate; dicognito's do not)"
    )


def best(runs: list[dict]) -> tuple[float, float, float]:
    """Best work wall seconds, CPU seconds and process wall seconds of a stage's runs."""
    return (
        min(r["seconds"] for r in runs),
        min(r["cpu_seconds"] for r in runs),
        min(r["process_seconds"] for r in runs),
    )


if __name__ == "__main__":
    main()
