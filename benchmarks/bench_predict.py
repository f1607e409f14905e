"""predict at real size: ``python -m ctpipe.predict`` (fp32 and INT8, ONNX Runtime) against the
same model through PyTorch and MONAI's ``sliding_window_inference``, on the same studies.

The studies are written by the cohort generator at the size of a clinical chest CT (by default
512 x 512 pixels of about 0.7 mm, 300 slices of 1.25 mm). Each pipeline runs in a process of its
own, one study at a time, and reports its wall seconds per study and its peak resident memory:

  predict fp32      python -m ctpipe.predict --model fp32 (the package in models/export)
  predict int8      python -m ctpipe.predict --model int8
  torch + MONAI     the same preprocessing, models/model.pt in PyTorch (channels-last), MONAI's
                    sliding_window_inference over the same views and mirrored passes (and the
                    same window: the whole slab where the spec says whole_slab; the same lung
                    box), the same post-processing; what a MONAI user would write

    python benchmarks/bench_predict.py [--studies 2] [--matrix 512] [--slices 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ctpipe import synth
from ctpipe.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]

# Run in a child process: one pipeline on one study, then print seconds and peak RSS as JSON.
CHILD = r"""
import json, sys, time
from pathlib import Path
kind, study, out, package, model = sys.argv[1:6]
start = time.perf_counter()
if kind == "predict":
    from ctpipe.deploy import predict
    code = predict.main([study, out, "--package", package, "--model", model])
    summary = json.loads((Path(out) / "summary.json").read_text())
    found = sum(s.get("nodules", 0) for s in summary["series"].values())
else:
    import numpy as np, torch
    from ctpipe import dicomio, intensity, prep
    from ctpipe.fileio import read_json
    from ctpipe.model import infer, nets
    from ctpipe.model.views import lung_roi
    from ctpipe.postprocessing.candidates import find_nodules
    spec = read_json(Path(package) / "input_spec.json")
    pre, inf, post = spec["preprocessing"], spec["inference"], spec["postprocessing"]
    ((uid, rel),) = dicomio.series_files(dicomio.scan_folder(study)).items()
    hu, geom = dicomio.read_series([Path(study) / p for p in rel])
    hu, geom = prep.resample(hu, geom, np.asarray(pre["target_spacing_mm_xyz"]), pre["interpolation"])
    hu, geom, _ = prep.crop_to_body(hu, geom, pre["body_crop"]["threshold_hu"], pre["body_crop"]["margin_mm"])
    volume = intensity.normalise(hu, pre["normalization"])
    box = lung_roi(volume, {"body_threshold_hu": pre["body_crop"]["threshold_hu"], **pre},
                   geom.spacing[::-1], inf.get("lung_margin_mm"))
    net, ckpt = nets.load_checkpoint(model)
    prob = infer.predict_volume(infer.torch_predictor(net), volume, int(spec["context_slices"]),
                                inf["roi_size"], inf["overlap"],
                                views=inf["views"], mirror_axes=inf["mirror_axes"],
                                whole_slab=inf["whole_slab"], box=box)
    _, cands = find_nodules(prob, geom, post["threshold"], post["component_threshold"],
                            post["min_candidate_mm3"], post["shape_weight"])
    code, found = 0, int(cands["detected"].sum())
seconds = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork and exec)
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
print(json.dumps({"code": code, "seconds": seconds, "peak_rss_mb": rss, "nodules": found}))
"""


def write_studies(root: Path, n: int, matrix: int, slices: int, seed: int) -> list[Path]:
    """``n`` synthetic studies at clinical size; returns their folders."""
    cfg = synth.Cohort(
        matrix=matrix,
        pixel_spacing_mm=(0.68, 0.72),
        slice_spacing_mm=(1.25,),
        z_extent_mm=1.25 * slices,
        fraction_without_nodules=0.0,
    )
    for i in range(n):
        start = time.perf_counter()
        synth.write_case(root / f"study{i}", seed, 5000 + i, cfg)
        print(f"  wrote study {i + 1}/{n} in {time.perf_counter() - start:.0f} s", flush=True)
    return [root / f"study{i}" for i in range(n)]


def run_one(kind: str, study: Path, out: Path, package: Path, model: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(study), str(out), str(package), model],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise SystemExit(f"{kind} {model} on {study} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--package", type=Path, default=ROOT / "models" / "export")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "model.pt")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    runs = {
        "predict fp32": ("predict", str(args.package), "fp32"),
        "predict int8": ("predict", str(args.package), "int8"),
        "torch + MONAI": ("torch", str(args.package), str(args.model)),
    }
    figures: dict[str, list[dict]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory(prefix="ctpipe-bench-predict-") as tmp:
        tmp = Path(tmp)
        print(f"writing {args.studies} studies of {args.matrix} x {args.matrix} x {args.slices}")
        studies = write_studies(tmp / "in", args.studies, args.matrix, args.slices, args.seed)
        for i, study in enumerate(studies):
            for name, (kind, package, model) in runs.items():
                out = tmp / "out" / f"{i}-{name.replace(' ', '_')}"
                figures[name].append(run_one(kind, study, out, Path(package), model))
                r = figures[name][-1]
                print(
                    f"  study {i + 1} {name:<14} {r['seconds']:6.1f} s  {r['peak_rss_mb']:6.0f} MB"
                    f"  {r['nodules']} nodules",
                    flush=True,
                )
    summary = {
        name: {
            "seconds_per_study": float(np.mean([r["seconds"] for r in rows])),
            "peak_rss_mb": float(max(r["peak_rss_mb"] for r in rows)),
        }
        for name, rows in figures.items()
    }
    base = summary["torch + MONAI"]["seconds_per_study"]
    print(f"\n{'pipeline':<16} {'s/study':>8} {'peak RSS MB':>12} {'speed-up':>9}")
    for name, s in summary.items():
        print(
            f"{name:<16} {s['seconds_per_study']:8.1f} {s['peak_rss_mb']:12.0f} "
            f"{base / s['seconds_per_study']:8.2f}x"
        )
    if args.out:
        write_json(
            args.out,
            {"size": [args.matrix, args.matrix, args.slices], "runs": figures, "summary": summary},
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
