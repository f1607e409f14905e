"""Free-text de-identification on hostile values: time against the length of the text.

One file whose comment holds a long run without a separator must not stall a cohort (issue 33):
scrubbing a kept descriptor, the leak gate's check of free text and the collection of the
cohort's names must take time linear in the text. For each family of adversarial text (long runs
of letters, of digits, of e-mail-, phone- or UID-like characters, of ``^``, of spaces, of
name-like tokens the terms match, titles, dates) and each length, prints the seconds of:

- scrub: :func:`ctpipe.deid.freetext.scrub` as the de-identifier calls it (the patterns, the
  file's identifying values and 300 cohort names);
- gate: the leak gate's free-text check of the value (:class:`ctpipe.deid.verify.FreeTextCheck`:
  patterns and cohort names);
- names: the person names a header value adds to the cohort's list (PN-formatted tokens).

Each value is timed in a process of its own, stopped after ``--timeout`` seconds. With
``--baseline REV`` the same calls of that revision's code are timed too (the code before issue 33
takes hours on 1 MB). Usage::

    python benchmarks/bench_freetext.py [--sizes 1000 100000 1000000] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {  # name -> (unit repeated to the length, a last character or "")
    "letters": ("a", ""),
    "digits": ("1", ""),
    "digits, then _": ("1", "_"),
    "letters and digits": ("a1", ""),
    "PN-like (^)": ("ab^", ""),
    "e-mail-like": ("a.b-c+", ""),
    "phone-like": ("-1.", ""),
    "UID-like": ("1.2.", "x"),
    "spaces": (" ", ","),
    "names": ("Doe Jane ", ""),
    "titles": ("Dr Aa ", ""),
    "dates": ("1 Jan ", ""),
    "hashes": ("# ", ""),
}
FILE_TERMS = ["DOE^JANE", "DOE", "JANE", "MRN5140354005", "82 Main St, Lyon", "Riverside Hospital"]
COHORT = ["doe", "jane"] + [f"name{i}x" for i in range(298)]
# Runs the three calls on one value (ctpipe from PYTHONPATH); prints their seconds as JSON.
PROBE = """
import json, sys, time
from ctpipe.deid import freetext
from ctpipe.deid.table import DeidOptions, Profile
from ctpipe.deid.verify import FreeTextCheck, name_index
unit, last, n, file_terms, cohort = json.loads(sys.argv[1])
value = (unit * (n // len(unit) + 1))[: n - len(last)] + last
if hasattr(freetext, "Terms"):
    terms = (freetext.Terms(file_terms), freetext.Terms(cohort))
else:  # before issue 33: one regex alternation per term set
    from ctpipe.deid.engine import clean_pattern
    terms = (clean_pattern(frozenset(file_terms)), clean_pattern(frozenset(cohort)))
check = FreeTextCheck(frozenset(Profile(DeidOptions()).descriptive), name_index(cohort, 4))
out = {}
start = time.perf_counter(); freetext.scrub(value, terms); out["scrub"] = time.perf_counter() - start
start = time.perf_counter(); check.findings([(0x0008103E, "LO", value)])
out["gate"] = time.perf_counter() - start
start = time.perf_counter(); freetext.name_components(freetext.pn_tokens(value))
out["names"] = time.perf_counter() - start
print(json.dumps(out))
"""
CALLS = ("scrub", "gate", "names")


def probe(code: Path, family: str, n: int, timeout: float) -> dict[str, float | None]:
    """Seconds of each call on one value, with the ctpipe package found under ``code``; None
    for all three when the process ran past ``timeout``."""
    unit, last = FAMILIES[family]
    arg = json.dumps([unit, last, n, FILE_TERMS, COHORT])
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, arg],
            cwd=code,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            env={**os.environ, "PYTHONPATH": str(code)},
        )
    except subprocess.TimeoutExpired:
        return dict.fromkeys(CALLS)
    return json.loads(done.stdout)


def checkout(rev: str, into: Path) -> Path:
    """The ``ctpipe`` package of git revision ``rev`` under ``into``."""
    archive = subprocess.run(
        ["git", "archive", rev, "ctpipe"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def cell(seconds: float | None, timeout: float) -> str:
    return f"> {timeout:.0f}" if seconds is None else f"{seconds:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--baseline", help="git revision to time as well (e.g. a commit)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per baseline run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_freetext_") as tmp:
        trees = {"this tree": ROOT}
        if args.baseline:
            trees[args.baseline] = checkout(args.baseline, Path(tmp))
        worst: dict[tuple[str, int], float | None] = {}
        print(f"{'code':12s} {'family':20s} {'chars':>9s} " + " ".join(f"{c:>8s}" for c in CALLS))
        for name, code in trees.items():
            for family in args.families:
                for n in args.sizes:
                    times = probe(code, family, n, args.timeout)
                    cells = " ".join(f"{cell(times[c], args.timeout):>8s}" for c in CALLS)
                    print(f"{name[:12]:12s} {family:20s} {n:9d} {cells}", flush=True)
                    slowest = None if None in times.values() else max(times.values())
                    old = worst.get((name, n), 0.0)
                    worst[name, n] = None if slowest is None or old is None else max(old, slowest)
        print("slowest call per length (seconds):")
        for (name, n), seconds in worst.items():
            print(f"  {name[:12]:12s} {n:9d} chars: {cell(seconds, args.timeout)}")


if __name__ == "__main__":
    main()
