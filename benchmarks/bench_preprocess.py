"""Preprocessing speed: ctpipe's per-case path against the MONAI transform chain a user would write.

Both read the same DICOM series from disk and do the same work: load (HU), resample to the same
target spacing (linear), clip and scale intensities, crop to the body. ctpipe also draws the nodule
mask (work MONAI's chain does not do here). Prints cases/s for each and the ratio.

    python benchmarks/bench_preprocess.py [--cases 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ctpipe import config, dicomio, prep, synth

ROOT = Path(__file__).resolve().parents[1]


def monai_chain(target_spacing, window, body_hu):
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    lo, hi = window
    return Compose(
        [
            LoadImaged(keys="image", reader="PydicomReader"),
            EnsureChannelFirstd(keys="image"),
            Spacingd(keys="image", pixdim=target_spacing, mode="bilinear"),
            ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            CropForegroundd(
                keys="image",
                source_key="image",
                select_fn=lambda x: x > (body_hu - lo) / (hi - lo),
                margin=2,
            ),
        ]
    )


def ours(source: dict, nodules: pd.DataFrame, plan: dict) -> tuple:
    return prep.process_case(source, nodules, plan)["image"].shape


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    params = config.load(ROOT / "params.yaml")
    cfg, pcfg = synth.Cohort.from_params(params.ingest.synthetic), params.preprocess
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for i in range(args.cases):
            rows += synth.write_case(Path(tmp), params.base.seed, i, cfg)
        nodules = synth.annotations_frame(rows)
        manifest = dicomio.scan_folder(tmp)
        sources = [
            {"kind": "dicom", "index": i, "paths": [str(Path(tmp) / p) for p in paths]}
            for i, (uid, paths) in enumerate(dicomio.series_files(manifest).items())
        ]
        per = [nodules[nodules["seriesuid"] == uid] for uid in dicomio.series_files(manifest)]
        fps = [prep.fingerprint_case(s, n, pcfg, 0) for s, n in zip(sources, per)]
        plan = prep.make_plan(fps, pcfg)
        spacing = plan["target_spacing_mm"]
        chain = monai_chain(spacing, pcfg.hu_window, pcfg.body_threshold_hu)
        folders = sorted({str(Path(s["paths"][0]).parent) for s in sources})

        t = time.perf_counter()
        for folder in folders:
            chain({"image": folder})
        t_monai = time.perf_counter() - t
        t = time.perf_counter()
        for s, n in zip(sources, per):
            ours(s, n, plan)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(partial(ours, plan=plan), sources, per))
        t_par = time.perf_counter() - t

    n = len(sources)
    print(f"{n} cases, target spacing {spacing} mm, cpu threads: 1 process unless stated")
    print(
        f"MONAI chain (LoadImage[PydicomReader], Spacing, ScaleIntensityRange, CropForeground): "
        f"{n / t_monai:6.2f} cases/s"
    )
    print(
        f"ctpipe preprocess, 1 process:                 {n / t_ours:6.2f} cases/s   "
        f"ratio {t_monai / t_ours:.2f}x"
    )
    print(
        f"ctpipe preprocess, {args.workers} processes:               {n / t_par:6.2f} cases/s   "
        f"ratio {t_monai / t_par:.2f}x"
    )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
