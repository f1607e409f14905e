"""Peak memory of evaluate and quantize against the size of the test split.

Both stages stream the test split one volume at a time, so their peak resident memory should not
grow with the number of test cases. This script copies ``data/processed`` with its test split cut
to N cases and with N cases made 2N (each test case again under another case id and series UID,
its nodules with it), runs ``stages/evaluate.py`` and ``stages/quantize.py`` on both, each in a
process of its own, and prints wall seconds and peak RSS side by side. With ``--baseline REV`` the
same stages of commit REV (a git worktree, its own ctpipe first on the path) run on the same data
too, for the figures before a change.

    python benchmarks/bench_stage_memory.py [--cases 6] [--stages evaluate quantize] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from ctpipe.fileio import write_csv, write_json
from ctpipe.volumes import case_files

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, runpy, sys, time
script, args = sys.argv[1], sys.argv[2:]
sys.argv = [script, *args]
start = time.perf_counter()
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork and exec)
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": rss}))
"""


def test_split_of(processed: Path, n: int, copies: int, out: Path) -> Path:
    """A copy of ``processed`` whose test split is its first ``n`` test cases, each ``copies``
    times (the copies under new case ids and series UIDs). Case files are linked, not copied."""
    index = json.loads((processed / "index.json").read_text())
    nodules = pd.read_csv(processed / "nodules.csv")
    test = [c for c in index["cases"] if c["split"] == "test"][:n]
    cases = [c for c in index["cases"] if c["split"] != "test"]
    (out / "cases").mkdir(parents=True)
    for path in (processed / "cases").iterdir():
        (out / "cases" / path.name).symlink_to(path.resolve())
    extra = []
    for k in range(copies):
        for case in test:
            new = (
                dict(case)
                if k == 0
                else {
                    **case,
                    "case_id": f"{case['case_id']}_copy{k}",
                    "seriesuid": f"{case['seriesuid']}.{k}",
                }
            )
            cases.append(new)
            if k:
                for copy, original in zip(
                    case_files(out, new["case_id"]), case_files(processed, case["case_id"])
                ):
                    copy.symlink_to(original.resolve())
                rows = nodules[nodules["seriesuid"] == case["seriesuid"]]
                extra.append(rows.assign(seriesuid=new["seriesuid"], case_id=new["case_id"]))
    for name in ("plan.json", "splits.json"):
        shutil.copy(processed / name, out / name)
    write_json(out / "index.json", {**index, "cases": cases})
    write_csv(out / "nodules.csv", pd.concat([nodules, *extra], ignore_index=True))
    return out


def reads_onnx(script: Path, env: dict) -> bool:
    """Whether a stage script takes ``--onnx`` (train's models/model.onnx); older revisions
    exported their own graph."""
    usage = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, env=env
    )
    return "--onnx" in usage.stdout


def run_stage(stage: str, processed: Path, tmp: Path, code: Path = ROOT) -> dict:
    outs = {
        "evaluate": [str(tmp / "plots")],
        "quantize": [str(tmp / "quantized")],
    }[stage]
    script = code / "stages" / f"{stage}.py"
    env = {**os.environ, "PYTHONPATH": str(code)}
    if reads_onnx(script, env):
        outs += ["--onnx", str(ROOT / "models" / "model.onnx")]
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        str(script),
        str(ROOT / "models" / "model.pt"),
        str(processed),
        *outs,
        "--postprocessing",
        str(ROOT / "models" / "postprocessing.json"),
        "--params",
        str(ROOT / "params.yaml"),
        "--metrics",
        str(tmp / f"{stage}.json"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=6, help="test cases of the smaller split")
    parser.add_argument("--stages", nargs="+", default=["evaluate", "quantize"])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--baseline", default=None, help="also run the stages of this git revision")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    figures = {}
    with tempfile.TemporaryDirectory(prefix="ctpipe-bench-memory-") as tmp:
        tmp = Path(tmp)
        codes = {"this tree": ROOT}
        if args.baseline:
            subprocess.run(
                ["git", "worktree", "add", "-q", "--detach", str(tmp / "baseline"), args.baseline],
                cwd=ROOT,
                check=True,
            )
            codes[args.baseline] = tmp / "baseline"
        try:
            for copies in (1, 2):
                n = args.cases * copies
                processed = test_split_of(args.data, args.cases, copies, tmp / f"processed{n}")
                for (name, code), stage in ((c, s) for c in codes.items() for s in args.stages):
                    work = tmp / f"{stage}{n}-{len(figures)}"
                    work.mkdir()
                    figures[f"{stage} {n} {name}"] = r = run_stage(stage, processed, work, code)
                    print(
                        f"{stage:<9} {name:<10} {n:3d} test cases: {r['seconds']:7.1f} s, "
                        f"peak RSS {r['peak_rss_mb']:7.0f} MB",
                        flush=True,
                    )
        finally:
            if args.baseline:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tmp / "baseline")],
                    cwd=ROOT,
                    check=False,
                )
    print()
    for (name, _), stage in ((c, s) for c in codes.items() for s in args.stages):
        small = figures[f"{stage} {args.cases} {name}"]
        large = figures[f"{stage} {2 * args.cases} {name}"]
        print(
            f"{stage:<9} {name:<10} peak RSS {small['peak_rss_mb']:.0f} MB with {args.cases} "
            f"test cases, {large['peak_rss_mb']:.0f} MB with {2 * args.cases} "
            f"(x{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}; time x"
            f"{large['seconds'] / small['seconds']:.2f})"
        )
    if args.out:
        write_json(args.out, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
