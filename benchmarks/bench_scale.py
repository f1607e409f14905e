"""Every stage at a chosen cohort size: seconds per case, peak memory and bytes written, N vs 2N.

Writes a synthetic chest-CT cohort of N patients with ``ctpipe.synth`` (default the size of
LUNA16 / LIDC-IDRI scans: 512 x 512 slices of 0.6-0.8 mm pixels, 1.25 mm apart over 300 mm, so 240
slices per patient) into a scratch repository in a temporary folder, as a ``dicom`` source
(``ingest.source: dicom``, ``data/synthetic`` with its ``annotations.csv``), then runs every stage
of ``dvc.yaml`` as ``dvc repro`` would: in its order, each stage script in a process of its own with
its ``dvc.yaml`` command line, in the scratch repository, with a ``params.yaml`` there that is this
tree's with the source switched, ``train.epochs`` set by ``--epochs`` and any ``--set`` applied.
For each stage it prints:

- seconds (the stage process, start-up included) and seconds per case;
- peak RSS: the largest resident set of one process of the stage (the script or one of its
  workers; ``ru_maxrss`` of a fresh wrapper's children, exact) and, apart, the peak of the sum over
  the stage's processes (sampled with psutil every 0.2 s, so short peaks may be missed);
- bytes written: the size of the stage's ``outs`` and ``metrics`` in ``dvc.yaml`` (the workspace
  copy; the DVC cache is not counted).

Writing the cohort (the generator, one process, patient after patient) is timed as a row of its
own; it is not a stage. With ``--double`` (N and 2N patients) or ``--sizes`` the whole run is
repeated per size on a new cohort (the larger cohort holds the smaller one's patients) and the peak
RSS of each stage is printed side by side with its growth (issue 36 asks for at most 10 % from N
to 2N: memory set by the largest case, not by the number of cases). Last comes a linear projection
of each stage's seconds to 888 (LUNA16) and 1,018 (LIDC-IDRI) cases on the machine it ran on (its
device is the one recorded in ``metrics/env/train.json``): with two sizes or more, a fixed part
plus a part per case fitted through the smallest and the largest size (train's time is set by
``--epochs`` and ``train.samples_per_epoch``, not by the cases, and the fit sees that); with one
size, seconds per case times the cases. A projection, not a measurement: memory, disk and the
params of a real run (more epochs) change it.

The scratch data is deleted at the end (a real-size cohort of 16 patients takes several GB: point
``--workdir`` at a disk with room). The anonymize key is a fixed one of this script (the synthetic
demo key is only for ``ingest.source: synthetic``; the pseudonyms decide the split, so every run and
every size split the same patients the same way); quantize's INT8 gate is opened
(``quantize.max_dice_drop`` 1.0: a model of one or two epochs is not what the gate judges) unless
``--set`` says otherwise. With the default params the split needs 4 patients or more (one each
for val and test); fewer need ``--set preprocess.split.val_fraction=...``. Usage::

    python benchmarks/bench_scale.py [--patients 8] [--double] [--sizes N ...] [--matrix 512]
        [--pixel-spacing 0.6 0.8] [--slice-spacing 1.25] [--z-extent 300] [--epochs 1]
        [--profile FILE] [--set SECTION.KEY=VALUE ...] [--params params.yaml] [--workdir DIR]
        [--out metrics/bench_scale.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from ctpipe import config, profiles, synth
from ctpipe.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]
CASES = {"LUNA16": 888, "LIDC-IDRI": 1018}
REAL = {"matrix": 512, "pixel_spacing_mm": (0.6, 0.8), "slice_spacing_mm": 1.25}
# Not a secret (synthetic patients): a fixed key keeps the pseudonyms, hence the split, the same.
DEID_KEY = hashlib.sha256(b"ctpipe bench_scale: synthetic cohort, no PHI").hexdigest()
GROWTH_LIMIT = 0.10  # issue 36: peak RSS may grow by at most 10 % from N to 2N

# A fresh process between the benchmark and a stage: its RUSAGE_CHILDREN is then the stage's
# alone (the largest process among the stage and its workers), not the benchmark's earlier runs.
WRAPPER = r"""
import json, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
code = subprocess.call(cmd)
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
open(out, "w").write(json.dumps({"returncode": code, "seconds": seconds, "peak_rss_mb": rss}))
sys.exit(code)
"""

# The cohort writer: patient after patient in one process, as a dicom source with its CSV.
GENERATOR = r"""
import json, sys
from pathlib import Path
from ctpipe import config, profiles, synth
from ctpipe.fileio import write_csv
out, n, seed, look = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
cohort = synth.Cohort(**{k: tuple(v) if isinstance(v, list) else v for k, v in look.items()})
rows = []
for index in range(n):
    rows += synth.write_case(out, seed, index, cohort)
write_csv(out / "annotations.csv", synth.annotations_frame(rows))
"""


def stages_of(dvc_yaml: Path) -> list[dict]:
    """The stages of ``dvc_yaml`` in its order (a valid order to run them): name, command line,
    and the paths of its outputs (``outs`` and ``metrics``)."""
    stages = []
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        if "${" in stage["cmd"]:
            raise SystemExit(f"{dvc_yaml}: stage {name}: templated cmd is not supported here")
        outs = [
            next(iter(o)) if isinstance(o, dict) else o
            for o in stage.get("outs", []) + stage.get("metrics", [])
        ]
        stages.append({"name": name, "cmd": shlex.split(stage["cmd"]), "outs": outs})
    return stages


def set_value(params: dict, assignment: str) -> None:
    """Apply ``SECTION.KEY=VALUE`` (VALUE read as YAML) to ``params``; the key must exist."""
    key, sep, value = assignment.partition("=")
    if not sep:
        raise SystemExit(f"--set {assignment}: expected SECTION.KEY=VALUE")
    try:
        profiles.override(params, key, yaml.safe_load(value), source=f"--set {assignment}")
    except config.ConfigError as exc:
        raise SystemExit(str(exc)) from None


def scale_params(args: argparse.Namespace) -> dict:
    """The params of the scratch repository: ``--params`` with the cohort as a dicom source."""
    params = yaml.safe_load(args.params.read_text())
    params["ingest"].update(
        source="dicom",
        source_dir="data/synthetic",
        annotations="data/synthetic/annotations.csv",
    )
    try:
        for path in args.profile:
            for key, value in profiles.load(path).items():
                profiles.override(params, key, value, source=str(path))
    except config.ConfigError as exc:
        raise SystemExit(str(exc)) from None
    params["train"]["epochs"] = args.epochs  # a short schedule, whatever the profile says
    params["quantize"]["max_dice_drop"] = 1.0
    for assignment in args.set:
        set_value(params, assignment)
    return params


def cohort_of(args: argparse.Namespace) -> synth.Cohort:
    """The cohort's look: real-size spacing at 512 pixels; at a smaller ``--matrix`` the pixels and
    slices are coarser in proportion (same chest, fewer voxels) unless given."""
    scale = REAL["matrix"] / args.matrix
    pixel = args.pixel_spacing or [s * scale for s in REAL["pixel_spacing_mm"]]
    dz = args.slice_spacing or REAL["slice_spacing_mm"] * scale
    return synth.Cohort().but(
        matrix=args.matrix,
        pixel_spacing_mm=tuple(pixel),
        slice_spacing_mm=(dz,),
        z_extent_mm=args.z_extent,
    )


def tree_peak(pid: int, stop: threading.Event, found: list[float]) -> None:
    """Peak sum of RSS (MB) of ``pid``'s descendants, sampled until ``stop``, into ``found``."""
    peak = 0
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.wait(0.2):
        total = 0
        try:
            for proc in root.children(recursive=True):
                try:
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
    found.append(peak / 2**20)


def bytes_under(repo: Path, paths: list[str]) -> int:
    """Bytes of the regular files at or under ``paths`` (links not followed)."""
    total = 0
    for rel in paths:
        path = repo / rel
        files = [path] if not path.is_dir() else [p for p in path.rglob("*")]
        total += sum(p.lstat().st_size for p in files if p.is_file() and not p.is_symlink())
    return total


def measure(name: str, cmd: list[str], repo: Path, env: dict) -> dict:
    """Run ``cmd`` in ``repo`` through the wrapper; seconds, peak RSS (largest process and sampled
    sum), its log under ``repo/logs``. A failed command ends the benchmark with its log's tail."""
    figures, log = repo / "logs" / f"{name}.json", repo / "logs" / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, str(figures), *cmd],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        stop, found = threading.Event(), []
        sampler = threading.Thread(target=tree_peak, args=(proc.pid, stop, found))
        sampler.start()
        proc.wait()
        stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    result = json.loads(figures.read_text())
    del result["returncode"]
    return {**result, "tree_peak_rss_mb": found[0] if found else 0.0}


def run_size(n: int, args: argparse.Namespace, tmp: Path, stages: list[dict]) -> dict:
    """Write a cohort of ``n`` patients into a scratch repository and run every stage there."""
    repo = tmp / f"n{n}"
    (repo / "logs").mkdir(parents=True)
    (repo / "stages").symlink_to(ROOT / "stages")
    params = scale_params(args)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "CTPIPE_DEID_KEY": DEID_KEY,
    }
    look = json.dumps(dataclasses.asdict(cohort_of(args)))
    source = repo / "data" / "synthetic"
    generate = [sys.executable, "-c", GENERATOR, str(source), str(n), str(params["base"]["seed"])]
    figures = {"generate": measure("generate", [*generate, look], repo, env)}
    figures["generate"]["bytes_written"] = bytes_under(repo, ["data/synthetic"])
    report_line(n, "generate", figures["generate"])
    for stage in stages:
        cmd = [sys.executable if part == "python" else part for part in stage["cmd"]]
        figures[stage["name"]] = r = measure(stage["name"], cmd, repo, env)
        r["bytes_written"] = bytes_under(repo, stage["outs"])
        report_line(n, stage["name"], r)
    train_env = repo / "metrics" / "env" / "train.json"
    device = json.loads(train_env.read_text()).get("device", {}) if train_env.is_file() else {}
    shutil.rmtree(repo)  # before the next size: one cohort on disk at a time
    return {"stages": figures, "device": device}


def report_line(n: int, name: str, r: dict) -> None:
    print(
        f"{n:4d} cases  {name:<18s} {r['seconds']:8.1f} s {r['seconds'] / n:8.2f} s/case "
        f"{r['peak_rss_mb']:8.0f} MB {r['tree_peak_rss_mb']:8.0f} MB "
        f"{r['bytes_written'] / 2**20:9.1f} MiB",
        flush=True,
    )


def growth(runs: dict[int, dict]) -> dict:
    """Peak RSS of each stage at the smallest and the largest size, and its growth."""
    small, large = min(runs), max(runs)
    table = {}
    for name, a in runs[small]["stages"].items():
        b = runs[large]["stages"][name]
        ratio = b["peak_rss_mb"] / a["peak_rss_mb"] - 1
        table[name] = {
            f"peak_rss_mb_{small}": round(a["peak_rss_mb"], 1),
            f"peak_rss_mb_{large}": round(b["peak_rss_mb"], 1),
            "growth": round(ratio, 4),
            "tree_growth": round(b["tree_peak_rss_mb"] / max(a["tree_peak_rss_mb"], 1) - 1, 4),
            "within_limit": ratio <= GROWTH_LIMIT,
        }
    return table


def projection(runs: dict[int, dict]) -> dict:
    """Seconds of each stage projected to the cases of ``CASES``: a fixed part plus a part per
    case through the smallest and the largest size (slope and fixed part at least 0), or seconds
    per case times cases with one size."""
    small, large = min(runs), max(runs)
    table = {}
    for name in runs[small]["stages"]:
        t_small = runs[small]["stages"][name]["seconds"]
        t_large = runs[large]["stages"][name]["seconds"]
        if large > small:
            per_case = max((t_large - t_small) / (large - small), 0.0)
            fixed = max(t_small - per_case * small, 0.0)
        else:
            per_case, fixed = t_small / small, 0.0
        table[name] = {
            "fixed_s": round(fixed, 2),
            "per_case_s": round(per_case, 3),
            **{label: round(fixed + per_case * c, 1) for label, c in CASES.items()},
        }
    return table


def report(runs: dict[int, dict]) -> dict:
    """Print the growth and projection tables; return them."""
    small, large = min(runs), max(runs)
    grown = growth(runs)
    if large > small:
        print(f"\npeak RSS, {small} -> {large} cases (limit +{GROWTH_LIMIT:.0%})")
        print(f"{'stage':<18s} {small:>7d} MB {large:>7d} MB {'growth':>8s} {'sum growth':>11s}")
        for name, g in grown.items():
            flag = "" if g["within_limit"] or name == "generate" else "  over the limit"
            print(
                f"{name:<18s} {g[f'peak_rss_mb_{small}']:10.0f} {g[f'peak_rss_mb_{large}']:10.0f}"
                f" {g['growth']:+8.1%} {g['tree_growth']:+11.1%}{flag}"
            )
        print("(sum: sampled every 0.2 s, so it misses short peaks and is noisy on short stages)")
    projected = projection(runs)
    fit = f"fixed + per case through {small} and {large} cases" if large > small else "per case"
    print(f"\nlinear projection ({fit}), this machine, these params")
    print(f"{'stage':<18s} {'fixed s':>9s} {'s/case':>8s}" + "".join(f"{k:>12s}" for k in CASES))
    for name, p in projected.items():
        hours = "".join(f"{p[k] / 3600:10.2f} h" for k in CASES)
        print(f"{name:<18s} {p['fixed_s']:9.1f} {p['per_case_s']:8.2f}{hours}")
    stages = [n for n in projected if n != "generate"]
    total = {k: sum(projected[n][k] for n in stages) for k in CASES}
    print(
        f"{'every stage':<18s} {'':9s} {'':8s}"
        + "".join(f"{total[k] / 3600:10.2f} h" for k in CASES)
    )
    return {"growth": grown, "projection": projected, "projected_total_s": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=8, help="N (default: %(default)s)")
    parser.add_argument("--double", action="store_true", help="run N and 2N patients")
    parser.add_argument("--sizes", type=int, nargs="+", help="patients per run (instead of N)")
    parser.add_argument("--matrix", type=int, default=REAL["matrix"], help="pixels per row")
    parser.add_argument(
        "--pixel-spacing",
        type=float,
        nargs=2,
        help="range of the in-plane spacing, mm (default: 0.6 0.8 x 512 / matrix)",
    )
    parser.add_argument(
        "--slice-spacing", type=float, help="mm between slices (default: 1.25 x 512 / matrix)"
    )
    parser.add_argument("--z-extent", type=float, default=300, help="cranio-caudal mm")
    parser.add_argument("--epochs", type=int, default=1, help="train.epochs (default: 1)")
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="apply a params profile first, e.g. profiles/real-size.yaml (docs/real-size.md)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change a param (YAML value), e.g. train.samples_per_epoch=400; repeatable",
    )
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="base params")
    parser.add_argument("--workdir", type=Path, help="folder of the scratch data (default: TMPDIR)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    sizes = sorted(
        set(args.sizes or [args.patients] + ([2 * args.patients] if args.double else []))
    )
    stages = stages_of(ROOT / "dvc.yaml")
    cohort = cohort_of(args)
    print(
        f"cohort: {args.matrix} x {args.matrix} pixels of {cohort.pixel_spacing_mm[0]:.2f}-"
        f"{cohort.pixel_spacing_mm[1]:.2f} mm, {cohort.slice_spacing_mm[0]:.2f} mm slices over "
        f"{args.z_extent:.0f} mm; {len(os.sched_getaffinity(0))} CPUs; sizes {sizes}"
    )
    print(
        f"{'':11s} {'stage':<18s} {'seconds':>10s} {'s/case':>13s} {'peak RSS':>11s} "
        f"{'sum RSS':>11s} {'written':>13s}"
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctpipe-bench-scale-", dir=args.workdir) as tmp:
        runs = {n: run_size(n, args, Path(tmp), stages) for n in sizes}
    tables = report(runs)
    device = runs[max(sizes)]["device"]
    print(
        f"device: {device.get('kind', 'unknown')}; benchmark took {time.perf_counter() - start:.0f} s"
    )
    if args.out:
        write_json(
            args.out,
            {
                "cohort": {**dataclasses.asdict(cohort), "patients": sizes},
                "profiles": [str(path) for path in args.profile],
                "params_set": [
                    f"train.epochs={args.epochs}",
                    "quantize.max_dice_drop=1.0",
                    *args.set,
                ],
                "cpus": len(os.sched_getaffinity(0)),
                "device": device,
                "runs": {str(n): r["stages"] for n, r in runs.items()},
                **tables,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
