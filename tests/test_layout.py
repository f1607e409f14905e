"""The layout the architecture relies on: package boundaries, no import-time side effects, predict
without PyTorch, modules and functions short enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("ctpipe", "stages", "scripts", "benchmarks")


def python_files(*folders: str) -> list[Path]:
    return sorted(
        p for f in folders for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts
    )


@pytest.mark.parametrize("init", sorted((ROOT / "ctpipe").rglob("__init__.py")), ids=str)
def test_package_inits_only_document(init):
    """An ``__init__`` holds a docstring (and ``__version__``), nothing that runs on import."""
    for node in ast.parse(init.read_text()).body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        version = isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "__version__"
        assert docstring or version, (
            f"{init.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:60]}"
        )


def test_no_script_benchmark_or_stage_imports_a_stage():
    """Stages are scripts run by DVC; shared code lives in ctpipe/, never imported from stages/."""
    for path in python_files("ctpipe", "stages", "scripts", "benchmarks"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.split(".")[0] == "stages", (
                    f"{path.relative_to(ROOT)} imports {name}"
                )
        assert "sys.path" not in path.read_text(), f"{path.relative_to(ROOT)} edits sys.path"


def test_predict_imports_neither_torch_nor_monai():
    """``python -m ctpipe.predict`` must run where only onnxruntime is installed."""
    code = "import sys, ctpipe.predict; print(sorted({'torch', 'monai'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_importing_training_data_leaves_monai_global_state_alone():
    code = (
        "from monai.data import get_track_meta; import ctpipe.model.data; print(get_track_meta())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "True"
