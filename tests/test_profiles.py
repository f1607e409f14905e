"""Params profiles (profiles/*.yaml): valid against params.yaml, turned into the dvc exp run
arguments that DVC applies to the same params."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctpipe import config, profiles

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
SCRIPT = ROOT / "scripts" / "profile.py"


def _script():
    spec = importlib.util.spec_from_file_location("profile_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", PROFILES, ids=[p.name for p in PROFILES])
def test_profile_applied_by_dvc_gives_the_checked_params(path, tmp_path):
    """DVC's own --set-param parser, fed the printed arguments, writes the params that the
    script checked: every value arrives with its type (lists stay lists, ints ints)."""
    from dvc.utils.hydra import apply_overrides

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    expected = _script().applied(params, profiles.load(path), path.name)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    args = out.stdout.split()
    assert args[::2] == ["--set-param"] * (len(args) // 2)
    copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", copy)
    apply_overrides(str(copy), args[1::2])
    assert yaml.safe_load(copy.read_text()) == expected
    config.load(copy)  # and the result is a params.yaml the stages accept


@pytest.mark.parametrize(
    "text, named",
    [
        ("train.patch_sise: 160\n", "train.patch_sise"),  # a typo
        ("train.patch_size: 150\n", "train.patch_size"),  # not a multiple of 16
        ("preprocess.target_spacing_mm: [0.7, 0.7]\n", "preprocess.target_spacing_mm"),
        ("- train.epochs\n", "expected a mapping"),
    ],
)
def test_a_profile_that_does_not_fit_is_refused_by_name(tmp_path, text, named):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    out = subprocess.run(
        [sys.executable, str(SCRIPT), str(bad)], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stdout == ""
    assert named in out.stderr and "bad.yaml" in out.stderr
