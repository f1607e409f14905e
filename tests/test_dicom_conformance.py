"""Every kind of DICOM file the pipeline writes passes dciodvfy (dicom3tools) without errors: the
synthetic CT, its de-identified copy, and the SEG and the TID 1500 SR that predict writes.

Warnings are allowed: the synthetic CT carries PHI where no IOD has it (the test fixture of
de-identification) and a private block dciodvfy cannot know."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ctpipe import synth
from ctpipe.deid.keys import KEY_ENV
from ctpipe.deploy import predict
from ctpipe.fileio import write_csv, write_json
from stages import anonymize

ROOT = Path(__file__).resolve().parents[1]
DCIODVFY = shutil.which("dciodvfy")

pytestmark = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed: apt-get install dicom3tools"
)


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines of dciodvfy's report on ``path`` that are errors (it writes them to stderr)."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def first_middle_last(folder: Path) -> list[Path]:
    files = sorted(folder.rglob("*.dcm"))
    assert files, f"no DICOM file under {folder}"
    return sorted({files[0], files[len(files) // 2], files[-1]})


@pytest.fixture(scope="module")
def written(tmp_path_factory, write_tiny_cohort, density_package) -> Path:
    """A tiny synthetic cohort as ingest writes it, its anonymized copy, and predict's outputs."""
    root = tmp_path_factory.mktemp("conformance")
    raw = root / "raw"
    rows = write_tiny_cohort(raw / "dicom", n=1, seed=21)
    write_csv(raw / "annotations.csv", synth.annotations_frame(rows))
    write_json(raw / "cohort.json", {"source": "synthetic"})
    full = yaml.safe_load((ROOT / "params.yaml").read_text())
    full["anonymize"].update(key_file="")  # a synthetic cohort needs no key
    full["base"].update(workers=1)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(full))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(KEY_ENV, raising=False)
        args = [str(raw), str(root / "anonymized"), "--private-dir", str(root / "private")]
        args += ["--params", str(params), "--metrics", str(root / "anonymize.json")]
        assert anonymize.main(args) == 0
    out = root / "predicted"
    assert predict.main([str(raw / "dicom"), str(out), "--package", str(density_package)]) == 0
    return root


@pytest.mark.parametrize("kind", ["synthetic", "anonymized", "seg", "sr"])
def test_dciodvfy_finds_no_error(written, kind):
    if kind == "synthetic":
        files = first_middle_last(written / "raw" / "dicom")
    elif kind == "anonymized":
        files = first_middle_last(written / "anonymized" / "dicom")
    else:
        files = sorted((written / "predicted").rglob(f"{kind}.dcm"))
        assert files, f"predict wrote no {kind}.dcm"
    errors = {str(f.relative_to(written)): dciodvfy_errors(f) for f in files}
    assert not any(errors.values()), errors
