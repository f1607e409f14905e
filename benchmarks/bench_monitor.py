"""How often the drift monitor raises a false alarm, and how often it catches each shift.

Reference: 30 cases of the tiny synthetic cohort (the test suite's). Windows of 15 cases: a new
sample of the same distribution (a flag is a false alarm), and samples with one shift each
(thinner slices, more noise, an intensity offset, another kernel name) and all of them together
(a missed flag is a miss). Over ``--seeds`` windows of each kind; prints the rates and writes
``metrics/bench_monitor.json``.

    python benchmarks/bench_monitor.py [--seeds 40] [--alpha 0.01]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ctpipe import synth
from ctpipe.fileio import write_json
from ctpipe.monitor import drift
from ctpipe.monitor.record import synthetic_features

ROOT = Path(__file__).resolve().parents[1]
TINY = synth.Cohort(
    n_patients=4,
    matrix=48,
    pixel_spacing_mm=(5.0, 6.0),
    slice_spacing_mm=(5.0,),
    vessels_per_lung=2,
    fraction_without_nodules=0.0,
    max_nodules=2,
    diameter_mm=(12, 30),
)
SHIFTS = {
    "slice thickness 5 -> 2.5 mm": {"slice_spacing_mm": [2.5]},
    "noise 20 -> 35 HU": {"noise_hu": 35},
    "intensity +40 HU": {"hu_offset": 40.0},
    "kernel B70f": {"kernel": "B70f"},
    "all four": {"slice_spacing_mm": (2.5,), "noise_hu": 35, "hu_offset": 40.0, "kernel": "B70f"},
}


def records(cohort: synth.Cohort, seed: int, n: int) -> list[dict]:
    return [synthetic_features(synth.make_case(seed, index, cohort)) for index in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--window", type=int, default=15)
    args = parser.parse_args()
    reference = records(TINY, 1000, 30)
    rates = {}
    for name, shift in {"none (false alarms)": {}, **SHIFTS}.items():
        flagged = 0
        for seed in range(args.seeds):
            window = records(TINY.but(**shift), 10_000 + 97 * seed + len(name), args.window)
            flagged += any(r["drift"] for r in drift.compare(reference, window, args.alpha))
        rates[name] = flagged / args.seeds
        print(
            f"{name:32} flagged in {flagged}/{args.seeds} windows ({rates[name]:.0%})", flush=True
        )
    write_json(
        ROOT / "metrics" / "bench_monitor.json",
        {
            "seeds": args.seeds,
            "alpha": args.alpha,
            "window": args.window,
            "reference": 30,
            "flag_rate": rates,
        },
    )


if __name__ == "__main__":
    main()
