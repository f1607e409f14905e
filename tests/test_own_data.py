"""The own-data recipe of docs/own-data.md, command by command, on a small DICOM folder that
carries PHI: `dvc add`, commit, a key in CTPIPE_DEID_KEY, `dvc exp run -S ...`, `dvc metrics show`."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ctpipe import synth

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run(repo: Path, command: str, env: dict) -> str:
    result = subprocess.run(
        command, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def recipe_commands() -> list[str]:
    """The shell lines of the recipe's code block in docs/own-data.md (continuations joined)."""
    text = (ROOT / "docs" / "own-data.md").read_text()
    block = re.search(r"## The recipe.*?```bash\n(.*?)```", text, re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def repo(tmp_path_factory, make_tiny_repo, command_env, write_tiny_cohort) -> tuple[Path, dict]:
    repo = make_tiny_repo(tmp_path_factory.mktemp("own"))
    # "/path/to/studies" and "/path/to/annotations.csv" of the recipe: 6 patients, DICOM with PHI.
    export = tmp_path_factory.mktemp("export")
    rows = write_tiny_cohort(export / "studies", n=6, seed=11)
    synth.annotations_frame(rows).to_csv(export / "annotations.csv", index=False)
    env = command_env(repo)
    key = secrets.token_hex(32)
    outputs = []
    for command in recipe_commands():
        command = command.replace("/path/to/studies", str(export / "studies"))
        command = command.replace("/path/to/annotations.csv", str(export / "annotations.csv"))
        if command.startswith("export CTPIPE_DEID_KEY="):
            env["CTPIPE_DEID_KEY"] = key  # the recipe's `export`, in this process's environment
            continue
        outputs.append(run(repo, command, env))
    return repo, {"key": key, "outputs": outputs, "rows": rows}


def test_recipe_ran_every_stage_on_the_dicom_folder(repo):
    repo, info = repo
    cohort = json.loads((repo / "data" / "raw" / "cohort.json").read_text())
    assert cohort["source"] == "dicom" and len(cohort["series"]) == 6
    ingest = json.loads((repo / "metrics" / "ingest.json").read_text())
    assert ingest["series_ok"] == 6 and ingest["annotations_unmatched"] == 0, ingest
    evaluate = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert {"dice", "froc_cpm"} <= set(evaluate)
    assert (repo / "models" / "export" / "model.onnx").is_file()
    assert "froc_cpm" in info["outputs"][-1]  # `dvc metrics show` printed the evaluation


def test_input_is_versioned_by_dvc_not_git(repo):
    repo, _ = repo
    entry = yaml.safe_load((repo / "data" / "cohort.dvc").read_text())["outs"][0]
    assert entry["path"] == "cohort" and entry["md5"].endswith(".dir") and entry["nfiles"] > 6
    tracked = subprocess.run(
        ["git", "ls-files", "data"], cwd=repo, capture_output=True, text=True
    ).stdout
    assert "data/cohort.dvc" in tracked and "data/cohort/" not in tracked


def test_real_cohort_used_the_key_and_no_identity_left(repo):
    repo, info = repo
    options = json.loads((repo / "data" / "anonymized" / "deid_options.json").read_text())
    assert options["cohort_source"] == "dicom" and options["key_source"] == "env"
    anonymize = json.loads((repo / "metrics" / "anonymize.json").read_text())
    assert anonymize["leaks_found"] == 0 and anonymize["files_quarantined"] == 0
    # The annotations follow the series to their keyed UIDs.
    annotations = pd.read_csv(repo / "data" / "anonymized" / "annotations.csv")
    originals = {r["seriesuid"] for r in info["rows"]}
    assert len(annotations) == len(info["rows"]) and not set(annotations["seriesuid"]) & originals


def test_the_same_commands_without_a_key_are_refused(repo, tmp_path, command_env):
    repo, _ = repo
    env = command_env(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["anonymize"]["key_file"] = str(tmp_path / "no.key")
    params["ingest"].update(source="dicom")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [
            sys.executable,
            "stages/anonymize.py",
            "data/raw",
            str(tmp_path / "out"),
            "--params",
            str(tmp_path / "params.yaml"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "refusing to de-identify a real cohort" in result.stderr
