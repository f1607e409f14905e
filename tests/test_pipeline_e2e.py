"""End to end: the real DVC commands on the real dvc.yaml, with tiny params, in a temporary git
repository: `dvc repro` (all eleven stages), a second `dvc repro` doing nothing,
`dvc exp run -S`, `dvc exp show` and `dvc metrics diff`."""

from __future__ import annotations

import hashlib
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
    "candidates",
    "classify",
    "malignancy",
    "evaluate",
    "quantize",
    "monitor_reference",
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
    assert "evaluate" in ran and ran <= {"evaluate", "monitor_reference", "export"}, out[-2000:]


def identifying_values(raw: Path) -> set[bytes]:
    """What identifies the raw cohort's patients, read from its files independently of the stage:
    names and their parts, IDs, birth dates, institutions, addresses and the original UIDs."""
    import pydicom

    keywords = (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientAddress",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "OperatorsName",
        "AccessionNumber",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
    )
    values: set[str] = set()
    for path in (raw / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in keywords:
            value = str(ds.get(keyword, "") or "")
            values.add(value)
            if keyword.endswith("Name") and "Institution" not in keyword:  # person names: parts
                values.update(value.split("^"))
    return {v.lower().encode() for v in values if len(v) >= 5}


def test_push_carries_no_phi_and_a_clone_pulls_the_model(repo, tmp_path):
    """A team's remote: `dvc push` sends no identifying byte, no raw or private output; a fresh
    clone pulls the model and has nothing to re-run."""
    remote = tmp_path / "remote"
    sh(repo, "dvc", "remote", "add", "-d", "team", str(remote))
    sh(repo, "git", "commit", "-qam", "team remote")
    sh(repo, "dvc", "push")
    pushed = [p for p in remote.rglob("*") if p.is_file()]
    assert pushed
    needles = identifying_values(repo / "data" / "raw")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    never = {
        o["md5"].removesuffix(".dir")
        for stage in ("ingest", "anonymize")
        for o in lock[stage]["outs"]
        if o["path"] in ("data/raw", "data/anonymize_private")
    }
    for path in pushed:
        data = path.read_bytes().lower() + str(path.relative_to(remote)).lower().encode()
        assert not [n for n in needles if n in data], path
        assert path.parent.name + path.name.removesuffix(".dir") not in never, path
    raw_files = {
        hashlib.md5(p.read_bytes()).hexdigest()
        for p in (repo / "data" / "raw").rglob("*")
        if p.is_file()
    }
    assert not raw_files & {p.parent.name + p.name for p in pushed}
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, env=ENV(repo))
    sh(clone, "dvc", "pull", "--allow-missing")
    assert (clone / "models" / "export" / "model.onnx").read_bytes() == (
        repo / "models" / "export" / "model.onnx"
    ).read_bytes()
    assert not (clone / "data" / "raw").exists()
    out = sh(clone, "dvc", "repro", "--allow-missing").stdout
    assert "Running stage" not in out, out[-2000:]
