"""End to end: the real DVC commands on the real dvc.yaml, with tiny params, in a temporary git
repository: `dvc repro` (all eight stages), a second `dvc repro` doing nothing,
`dvc exp run -S`, `dvc exp show` and `dvc metrics diff`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ENV = None  # command_env, set by the repo fixture
ROOT = Path(__file__).resolve().parents[1]
STAGES = [
    "ingest",
    "anonymize",
    "preprocess",
    "train",
    "postprocess",
    "evaluate",
    "quantize",
    "export",
]


def sh(repo: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, cwd=repo, env=ENV(repo), capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory, make_tiny_repo, command_env) -> Path:
    global ENV
    ENV = command_env
    repo = make_tiny_repo(tmp_path_factory.mktemp("repo"))
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny run")
    return repo


def test_repro_runs_every_stage(repo):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    for stage in STAGES:
        assert (repo / "metrics" / f"{stage}.json").is_file(), stage
        env = json.loads((repo / "metrics" / "env" / f"{stage}.json").read_text())
        assert env["packages"]["torch"] and env["device"]["kind"] in ("cpu", "cuda")
        assert len(env["git_revision"]) == 40, env["git_revision"]  # the tiny repo's commit
    evaluate = json.loads((repo / "metrics" / "evaluate.json").read_text())
    for key in ("dice", "iou", "hd95_mm", "froc_cpm", "sensitivity", "fp_per_scan"):
        assert key in evaluate
    assert (repo / "models" / "export" / "model.onnx").is_file()
    assert (repo / "data" / "processed" / "index.json").is_file()
    # Metrics are kept in git (cache: false), so `dvc metrics diff` works on a fresh clone.
    tracked = sh(repo, "git", "ls-files", "metrics").stdout.split()
    assert "metrics/evaluate.json" in tracked


def test_second_repro_does_nothing(repo):
    out = sh(repo, "dvc", "repro").stdout
    assert "up to date" in out
    assert "Running stage" not in out


def test_forced_rerun_is_identical(repo):
    """Same params, same machine: identical data hashes up to preprocess, identical CPU metrics."""

    def snapshot():
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        # Data outputs only: metrics/env/<stage>.json records the environment, not results.
        hashes = {
            s: [(o["path"], o["md5"]) for o in lock[s]["outs"] if o["path"].startswith("data/")]
            for s in ("ingest", "anonymize", "preprocess")
        }
        metrics = {s: (repo / "metrics" / f"{s}.json").read_text() for s in ("train", "evaluate")}
        return hashes, metrics

    before = snapshot()
    sh(repo, "dvc", "repro", "-f")
    assert snapshot() == before


def test_exp_run_and_metrics_diff(repo):
    out = sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.01").stdout
    assert "Running stage 'train'" in out
    assert "Running stage 'postprocess'" in out  # a new model gets its own post-processing
    assert "Running stage 'ingest'" not in out  # only train and what follows it re-run
    diff = sh(repo, "dvc", "params", "diff").stdout
    assert "train.lr" in diff
    metrics_diff = sh(repo, "dvc", "metrics", "diff", "--json").stdout
    changed = json.loads(metrics_diff)
    assert "metrics/train.json" in changed
    show = sh(repo, "dvc", "exp", "show", "--no-pager", "--only-changed", "--md").stdout
    assert "train.lr" in show and "0.01" in show


def test_evaluate_param_reruns_only_evaluate_and_dependants(repo):
    out = sh(repo, "dvc", "exp", "run", "-S", "evaluate.bootstrap=30").stdout
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in out}
    # export reads evaluate's metrics (model card): it re-runs only if they changed.
    assert "evaluate" in ran and ran <= {"evaluate", "export"}, out[-2000:]
