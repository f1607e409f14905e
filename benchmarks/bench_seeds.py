"""Seed study: how much of the test result is the seed? The pipeline up to evaluate, once per seed.

Each run is a scratch clone of this repository's HEAD (committed code and params, nothing of the
working tree) in a temporary folder, with one seed changed in its ``params.yaml``:

* ``--train-seeds``: ``train.seed`` (initialisation and patch sampling) on the default cohort;
* ``--cohort-seeds``: ``base.seed`` (another synthetic cohort, split and, with ``train.seed: null``,
  training seed).

``--profile FILE`` (a params profile, ``profiles/*.yaml``: dotted keys and values) is applied to
every run first, to measure a candidate default over seeds before it is committed; the runs then
re-run whatever it changes, and ``metrics/seeds.json`` records it (give ``--out`` another file to
keep the committed study).

``dvc repro evaluate`` runs in the clone with this repository's DVC cache, after ``dvc checkout``,
so a stage whose deps and params match ``dvc.lock`` (the committed default run, the data stages
of the default cohort) is restored instead of re-run; a run whose training was restored is marked
``reused``. Prints a table and
writes ``metrics/seeds.json``: per run test Dice, CPM (with the candidate classifier, and of the
segmentation's score alone), sensitivity at 1 FP/scan and at the
operating point per nodule type (juxta-pleural, juxta-vascular, ...), the malignancy model's test
ROC AUC beside the diameter's and its paired gain (``malignancy``), the training's best
validation epoch and selected epoch, the post-processing chosen on validation, and seconds; then
min, mean and standard deviation over the runs. The clones are deleted afterwards (``--keep`` keeps
them). Run from the repository root with the venv active::

    python benchmarks/bench_seeds.py --train-seeds 42 1 2 --cohort-seeds 7 13

On 2 CPU cores a run that trains takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ctpipe import profiles
from ctpipe.fileio import write_json
from ctpipe.runenv import cpu_info, git_revision

ROOT = Path(__file__).resolve().parents[1]

FIGURES = ("dice", "froc_cpm", "froc_cpm_segmentation", "sensitivity_at_1fp")


def sh(cwd: Path, *cmd: str, log: Path | None = None) -> None:
    # The clone's own package first: the venv's editable install points at this working tree,
    # whose uncommitted code is not the clone's.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(cwd),
        "DVC_NO_ANALYTICS": "1",
    }
    with open(log, "a") if log else open(os.devnull, "w") as out:
        result = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed in {cwd} (exit {result.returncode}); log: {log}"
        )


def one_run(
    workdir: Path, name: str, changes: dict[str, dict], keep: bool, profile: dict | None = None
) -> dict:
    """Clone, apply ``profile`` (dotted keys), set the seed, ``dvc repro evaluate``, read the
    metrics."""
    clone = workdir / name
    log = workdir / f"{name}.log"
    sh(workdir, "git", "clone", "-q", str(ROOT), str(clone))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    for key, value in (profile or {}).items():
        profiles.override(params, key, value, "profile")
    for section, values in changes.items():
        params[section].update(values)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(clone, "dvc", "cache", "dir", "--local", str(ROOT / ".dvc" / "cache"), log=log)
    # dvc repro re-runs a stage whose outputs are missing; restore what the cache has first.
    sh(clone, "dvc", "checkout", "--allow-missing", log=log)
    start = time.perf_counter()
    sh(clone, "dvc", "repro", "evaluate", log=log)
    seconds = time.perf_counter() - start
    ran = [
        line.split("'")[1]
        for line in log.read_text().splitlines()
        if line.startswith("Running stage '")
    ]
    evaluate = json.loads((clone / "metrics" / "evaluate.json").read_text())
    train = json.loads((clone / "metrics" / "train.json").read_text())
    post = json.loads((clone / "metrics" / "postprocess.json").read_text())
    classify_file = clone / "metrics" / "classify.json"
    second = json.loads(classify_file.read_text()) if classify_file.is_file() else {}
    malignancy_file = clone / "metrics" / "malignancy.json"
    third = json.loads(malignancy_file.read_text()) if malignancy_file.is_file() else {}
    if not keep:
        shutil.rmtree(clone)
    return {
        "run": name,
        "changes": changes,
        **({"profile": profile} if profile else {}),
        "stages_run": ran,
        "reused": "train" not in ran,
        "seconds": round(seconds, 1),
        "dice": evaluate["dice"],
        "froc_cpm": evaluate["froc_cpm"],
        # the same candidates ranked by the segmentation alone (without the candidate classifier)
        "froc_cpm_segmentation": evaluate.get("froc_cpm_segmentation", evaluate["froc_cpm"]),
        "classifier": {
            k: second.get(k) for k in ("weight", "val_auc", "val_cpm", "val_cpm_without")
        },
        "malignancy": {  # the malignancy model beside the segmentation's diameter (test ROC AUC)
            k: evaluate.get(f"malignancy_{k}")
            for k in (
                *("auc", "auc_ci95", "auc_diameter", "auc_diameter_ci95"),
                *("auc_gain", "auc_gain_ci95", "nodules", "malignant"),
            )
        }
        | {k: third.get(k) for k in ("uses_image_figures", "val_gain_share")},
        "sensitivity_at_1fp": evaluate["sensitivity_at_fp"]["1"],
        "sensitivity": evaluate["sensitivity"],
        "fp_per_scan": evaluate["fp_per_scan"],
        "sensitivity_by_type": evaluate.get("sensitivity_by_type", {}),
        "best_epoch": train.get("best_epoch"),
        "selected_epoch": train.get("selected_epoch"),
        "postprocessing": {
            k: post[k] for k in ("threshold", "component_threshold", "shape_weight")
        },
        "val_dice": post.get("val_dice"),
        "val_cpm": post.get("val_cpm"),
    }


def summary(runs: list[dict]) -> dict:
    out = {}
    for key in FIGURES:
        values = [float(r[key]) for r in runs]
        out[key] = {
            "min": min(values),
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "max": max(values),
        }
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="*",
        default=[42, 1, 2],
        help="train.seed values on the default cohort (default: %(default)s)",
    )
    parser.add_argument(
        "--cohort-seeds",
        type=int,
        nargs="*",
        default=[7, 13],
        help="base.seed values: other cohorts (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="params profile (profiles/*.yaml) applied to every run (default: none)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "seeds.json")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the clones go (default: a temp folder)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the clones and their logs")
    return parser.parse_args(argv)


def print_table(runs: list[dict], stats: dict) -> None:
    print(
        f"\n{'run':<18} {'Dice':>6} {'CPM':>6} {'s@1FP':>6} {'epoch':>6}  post-processing (t, h, w)"
    )
    for r in runs:
        p = r["postprocessing"]
        print(
            f"{r['run']:<18} {r['dice']:6.3f} {r['froc_cpm']:6.3f} {r['sensitivity_at_1fp']:6.2f} "
            f"{r['selected_epoch']!s:>6}  {p['threshold']:g}, {p['component_threshold']:g}, {p['shape_weight']:g}"
        )
    for key in FIGURES:
        s = stats[key]
        print(
            f"{key:<18} min {s['min']:.3f}  mean {s['mean']:.3f}  std {s['std']:.3f}  max {s['max']:.3f}"
        )
    gains = [
        r["malignancy"]["auc_gain"] for r in runs if r["malignancy"].get("auc_gain") is not None
    ]
    for r in runs:
        m = r["malignancy"]
        if m.get("auc") is not None:
            print(
                f"{r['run']:<18} malignancy AUC {m['auc']:.3f}, diameter {m['auc_diameter']:.3f}, "
                f"gain {m['auc_gain']:+.3f} {m['auc_gain_ci95']}"
            )
    if gains:
        spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
        print(
            f"malignancy gain over the diameter: mean {statistics.fmean(gains):+.3f}, sd {spread:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if dirty:
        print(
            "note: uncommitted changes are not in the runs (each run clones HEAD)", file=sys.stderr
        )
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    profile = None
    if args.profile:
        try:  # checked on this checkout's params before any run: a typo fails here, not in a clone
            profile = profiles.load(args.profile)
            for key, value in profile.items():
                profiles.override(params, key, value, str(args.profile))
        except profiles.ConfigError as exc:
            print(f"bench_seeds: {exc}", file=sys.stderr)
            return 2
    base_seed = int(params["base"]["seed"])
    plan = [
        (f"train_seed_{s}", {"train": {"seed": s}} if s != base_seed else {})
        for s in args.train_seeds
    ]
    plan += [(f"cohort_seed_{s}", {"base": {"seed": s}}) for s in args.cohort_seeds]
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ctpipe-seeds-", dir=args.workdir))
    start, runs = time.perf_counter(), []
    try:
        for i, (name, changes) in enumerate(plan, 1):
            print(
                f"[{i}/{len(plan)}] {name}: {changes or 'default params'} (log: {workdir / name}.log)",
                flush=True,
            )
            runs.append(one_run(workdir, name, changes, args.keep, profile))
            r = runs[-1]
            print(
                f"    Dice {r['dice']:.3f}  CPM {r['froc_cpm']:.3f}  sens@1FP {r['sensitivity_at_1fp']:.2f}  "
                f"post {r['postprocessing']}  {r['seconds']:.0f} s{' (reused)' if r['reused'] else ''}",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    stats = summary(runs)
    write_json(
        args.out,
        {
            "git_revision": git_revision(),
            "cpu": cpu_info(),
            "cpu_count": os.cpu_count(),
            "seconds_total": round(time.perf_counter() - start, 1),
            "runs": runs,
            "summary": stats,
        },
    )
    print_table(runs, stats)
    print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
