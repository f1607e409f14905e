"""De-identification takes time linear in the text (issue 33): one hostile value cannot stall a
cohort. Each check runs in a process of its own with a wall limit far above what the linear code
needs (a fraction of a second for 1 MB here) and far below what the backtracking patterns took
(hours for 1 MB, as the square of the length or worse): it fails instead of hanging."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml

from ctpipe.deid import freetext

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
LIMIT_S = 10  # for 1 MB; the linear code needs well under 1 s on the 2-core CI machine


def in_process_of_its_own(code: str, timeout: float = LIMIT_S) -> str:
    """Run ``code`` in a fresh interpreter with this tree's ctpipe; its stdout (fails the test
    when it runs past ``timeout`` seconds)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout + 5,  # + the interpreter's start-up and imports
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"not done after {timeout + 5} s: not linear in the text")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


SCRUB = """
import json, sys, time
from ctpipe.deid import freetext
value = {value}
file_terms, cohort = ["DOE^JANE", "MRN5140354005"], ["doe", "jane"] + [f"n{{i}}x" for i in range(300)]
if hasattr(freetext, "Terms"):  # as the de-identifier scrubs (the code before issue 33: below)
    terms = (freetext.Terms(file_terms), freetext.Terms(cohort))
else:
    from ctpipe.deid.engine import clean_pattern
    terms = (clean_pattern(frozenset(file_terms)), clean_pattern(frozenset(cohort)))
scrub = freetext.scrub
start = time.perf_counter()
out = scrub(value, terms)
print(json.dumps({{"seconds": time.perf_counter() - start, "length": len(out), "head": out[:40],
                  "tail": out[-40:]}}))
"""
# name -> (a 1 MB value, as Python; what scrubbing leaves of it: nothing matches in the first
# four, so only the separators at the ends go)
HOSTILE = {
    "letters without a separator": ('"a" * 1_000_000', None),
    "digits, then an underscore": ('"1" * 999_999 + "_"', None),
    "e-mail-like, no @": ('"a.b-c+" * 166_666 + "a.b-"', None),
    "phone-like, no end": ('"-1." * 333_333 + "-"', None),
    "a name, then a run with no ^": ('"DOE^JANE " + "a" * 999_991', '"a" * 999_991'),
    "names the terms remove": ('"Doe Jane, " * 100_000 + "CT chest"', '"CT chest"'),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_megabyte_of_hostile_text_is_scrubbed_in_linear_time(name):
    value, left = HOSTILE[name]
    expected = eval(left or value).strip(" ,;:-/")  # the literals above
    out = json.loads(in_process_of_its_own(SCRUB.format(value=value)))
    assert (out["length"], out["head"], out["tail"]) == (
        len(expected),
        expected[:40],
        expected[-40:],
    )


GATE = """
import json, time
from ctpipe.deid.freetext import name_components, pn_tokens
from ctpipe.deid.verify import FreeTextCheck, name_index
value = "seen by Dr Fenwick Oddsworth, call +44 20 7946 0958, " + "x" * 999_000 + " Jane"
check = FreeTextCheck(frozenset(), name_index({"jane", "fenwick"}, 4))
start = time.perf_counter()
found = check.findings([(0x00204000, "LT", value)])
names = name_components(pn_tokens("for DOE^JANE " + "a" * 999_987))
print(json.dumps({"seconds": time.perf_counter() - start, "found": found, "names": sorted(names)}))
"""


def test_the_gate_and_the_name_list_read_a_hostile_megabyte_in_linear_time():
    out = json.loads(in_process_of_its_own(GATE))
    assert "titled name 'Dr Fenwick Oddsworth' in (0020,4000)" in out["found"]
    assert "phone number '+44 20 7946 0958' in (0020,4000)" in out["found"]
    assert "cohort name ('jane',) in (0020,4000)" in out["found"]
    assert out["names"] == ["doe", "jane"]


def test_a_series_with_120000_character_comments_goes_through_the_stage(
    write_tiny_cohort, tmp_path
):
    """The case of issue 33: every file of a series holds a 120,000-character ImageComments (a
    name, then a run without a separator). The stage de-identifies them all, in time."""
    raw = tmp_path / "raw"
    write_tiny_cohort(raw / "dicom", n=1, seed=3)
    (raw / "cohort.json").write_text(json.dumps({"source": "synthetic"}))
    files = sorted((raw / "dicom").rglob("*.dcm"))
    comment = "seen with QUINCE^MARGARETTA " + "a" * 119_972
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ImageComments = comment
        ds.save_as(path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["anonymize"].update(key_file="")
    params["base"].update(workers=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, private = tmp_path / "anon", tmp_path / "private"
    env = {k: v for k, v in os.environ.items() if k != "CTPIPE_DEID_KEY"}
    stage = subprocess.Popen(
        [sys.executable, "stages/anonymize.py", raw, out, "--private-dir", private]
        + ["--params", tmp_path / "params.yaml", "--metrics", tmp_path / "anonymize.json"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # its worker processes in its group, to stop them all
    )
    try:  # the linear code: seconds; the code of issue 33: 24 s a file and worker
        _, stderr = stage.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(stage.pid, signal.SIGKILL)
        stage.communicate()
        pytest.fail("the stage did not finish in 300 s")
    assert stage.returncode == 0, stderr[-3000:]
    metrics = json.loads((tmp_path / "anonymize.json").read_text())
    assert (metrics["files_out"], metrics["leaks_found"]) == (len(files), 0)
    for path in out.rglob("*.dcm"):
        data = path.read_bytes().lower()
        assert b"quince" not in data and b"margaretta" not in data and b"a" * 1000 not in data
        assert "ImageComments" not in pydicom.dcmread(path)


# The patterns as they were before they were made linear: what the linear ones must still find.
BACKTRACKING = {
    "e-mail address": r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+",
    "person name (PN format)": r"[^\s\\,;:()\[\]]*\^[^\s\\,;:()\[\]]*",
    "phone number": r"(?<![\w.])\+?(?:\(?\d[\d ()./-]{5,}\d)(?![\w.])",
    "identifier": r"#\s*\d+|\b[^\W_]*\d{5,}[^\W_]*\b",
}
PIECES = list("aZ19^@.+-() /\\,;:[]_#'\té") + ["Dr ", "Jan ", "2021", "12345", "x@y.org", "+44"]


def test_the_linear_patterns_find_what_the_backtracking_ones_found():
    """On short random strings of the characters the patterns turn on (seeded): the same
    matches, and the same tidying."""
    rng = random.Random(33)
    old_tidy = re.compile(r"\s*([,;:])(?:\s*[,;:])+")
    for _ in range(4000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 24)))
        for name, pattern in BACKTRACKING.items():
            old = [m.span() for m in re.finditer(pattern, text)]
            assert [m.span() for m in freetext.PATTERNS[name].finditer(text)] == old, (name, text)
        assert freetext.REPEATED_SEPARATORS.sub(r"\1", text) == old_tidy.sub(r"\1", text), text
