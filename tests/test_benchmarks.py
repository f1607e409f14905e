"""Every script in benchmarks/ runs as its docstring and docs/benchmarks.md say: what it imports
exists, it starts, the options they show are its own, and the de-identification benchmarks run
their smallest configuration (a broken benchmark fails here, not in the hands of a reader)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def run(args: list, timeout: float = 600) -> subprocess.CompletedProcess:
    """A benchmark as a reader runs it (from the repository root), with this tree's ctpipe."""
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
    """(module, names taken from it, line) of every import, in functions too."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def defined(module: str) -> set[str]:
    """Top-level names of a first-party module (its functions, classes, assignments, imports)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.is_file():  # a package: its modules are importable names
        return {p.stem for p in path.with_suffix("").iterdir()}
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_what_a_benchmark_imports_exists(script):
    """Every import resolves (a module of stages/ run as a script does not: ``import anonymize``
    was one), and every name taken from ctpipe is defined there."""
    for module, names, line in imports(ast.parse(script.read_text())):
        where = f"{script.name}:{line} imports {module}"
        assert importlib.util.find_spec(module.split(".")[0]) is not None, where
        if module.split(".")[0] == "ctpipe":
            assert importlib.util.find_spec(module) is not None, where
            missing = set(names) - defined(module)
            assert not missing, f"{where}: no {sorted(missing)} there"


def usage(script: Path) -> str:
    """The command lines a benchmark's docstring shows (``python benchmarks/...`` and the
    indented lines that continue it)."""
    lines = (ast.get_docstring(ast.parse(script.read_text())) or "").splitlines()
    shown, inside = [], False
    for line in lines:
        inside = f"python benchmarks/{script.name}" in line or (inside and line.startswith("  "))
        if inside:
            shown.append(line)
    return "\n".join(shown)


def documented(script: Path) -> str:
    """The code spans of docs/benchmarks.md that run ``script``."""
    spans = re.findall(r"`([^`]+)`", (ROOT / "docs" / "benchmarks.md").read_text())
    return "\n".join(s for s in spans if script.name in s)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_benchmark_starts_with_the_options_it_documents(script):
    assert usage(script), (
        f"{script.name}: no 'python benchmarks/{script.name} ...' in its docstring"
    )
    done = run([script.relative_to(ROOT), "--help"])
    assert done.returncode == 0, done.stderr[-2000:]
    shown = set(re.findall(r"--[a-z][a-z0-9-]*", usage(script) + "\n" + documented(script)))
    options = set(re.findall(r"--[a-z][a-z0-9-]*", done.stdout))
    assert shown <= options, f"{script.name}: documented but unknown: {sorted(shown - options)}"


@pytest.mark.slow
def test_bench_anonymize_runs_its_smallest_configuration(tmp_path):
    done = run(
        ["benchmarks/bench_anonymize.py", "--patients", "1", "--matrix", "32", "--repeat", "1"]
        + ["--workers", "2", "--workdir", tmp_path]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"one core: ctpipe 1 worker / dicognito = [\d.]+x", done.stdout)
    assert re.search(r"2 workers / 1 worker = [\d.]+x", done.stdout)
    assert "leaks_found=0" in done.stdout


def test_bench_freetext_runs_its_smallest_configuration():
    done = run(["benchmarks/bench_freetext.py", "--sizes", "1000", "--families", "letters"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"this tree\s+letters\s+1000\s+[\d.]+\s+[\d.]+\s+[\d.]+", done.stdout)


# The smallest cohort that can be split into train, val and test (one patient each, with these
# fractions), and the tiniest network and sweeps: the stages' start-up is most of the time. Seed 10
# gives each of the 3 patients a nodule of 11 mm or more, so the test case keeps nodule voxels at
# 5-6 mm pixels (evaluate fails with KeyError 'dice' on a test split without any).
SCALE_TINY = [
    "--matrix", "64", "--epochs", "1",
    "--set", "base.seed=10",
    "--set", "base.workers=1",
    "--set", "preprocess.split.val_fraction=0.34",
    "--set", "preprocess.split.test_fraction=0.3",
    "--set", "train.features=[4,4,8,8,16,4]",
    "--set", "train.patch_size=32",
    "--set", "train.batch_size=4",
    "--set", "train.samples_per_epoch=8",
    "--set", "inference.mirror_axes=[]",
    "--set", "evaluate.bootstrap=20",
    "--set", "quantize.schemes=[S8S8]",
    "--set", "quantize.calibration_methods=[minmax]",
    "--set", "quantize.calibration_slabs=8",
    "--set", "quantize.sweep_slabs=16",
]  # fmt: skip


@pytest.mark.slow
def test_bench_scale_runs_its_smallest_configuration(tmp_path):
    out = tmp_path / "scale.json"
    done = run(
        ["benchmarks/bench_scale.py", "--sizes", "3", *SCALE_TINY]
        + ["--workdir", tmp_path, "--out", out]
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(figures["runs"]["3"]) == {"generate", *stages}  # key-sorted JSON
    for name, r in figures["runs"]["3"].items():
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 50, name
        assert re.search(rf"\n\s+3 cases\s+{name}\s+[\d.]+ s", done.stdout), name
    assert figures["runs"]["3"]["ingest"]["bytes_written"] > 0
    assert figures["projection"]["train"]["LUNA16"] > 0
    assert re.search(r"every stage\s+[\d.]+ h\s+[\d.]+ h", done.stdout)
    assert [p.name for p in tmp_path.iterdir()] == ["scale.json"]  # the scratch data is gone


def test_bench_scale_reports_growth_and_projection():
    """The N vs 2N table of bench_scale: a stage whose peak doubles is over the limit, and the
    projection is the straight line through the two sizes."""
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks/bench_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def stage(seconds, rss):
        return {"seconds": seconds, "peak_rss_mb": rss, "tree_peak_rss_mb": rss}

    runs = {
        4: {"stages": {"flat": stage(10, 1000), "grows": stage(8, 500)}},
        8: {"stages": {"flat": stage(18, 1050), "grows": stage(8, 1000)}},
    }
    tables = bench.report(runs)
    assert tables["growth"]["flat"]["within_limit"] and tables["growth"]["flat"]["growth"] == 0.05
    assert not tables["growth"]["grows"]["within_limit"]
    flat = tables["projection"]["flat"]
    assert (flat["fixed_s"], flat["per_case_s"], flat["LUNA16"]) == (2.0, 2.0, 2 + 2 * 888)
    assert tables["projection"]["grows"]["LIDC-IDRI"] == 8.0  # no per-case part: fixed
    assert tables["projected_total_s"]["LUNA16"] == 2 + 2 * 888 + 8


@pytest.mark.slow
def test_bench_scaleout_runs_its_smallest_configuration(tmp_path, density_package):
    """One study per configuration and a kill test of four: every study arrives, none twice."""
    import brokerkit

    if not brokerkit.available():
        pytest.skip(f"needs RabbitMQ: {brokerkit.INSTALL}")
    out = tmp_path / "scaleout.json"
    done = run(
        ["benchmarks/bench_scaleout.py", "--studies", "1", "--kill-studies", "4"]
        + ["--package", density_package, "--workdir", tmp_path, "--out", out, "--timeout", "300"]
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["runs"]) == {
        "one process", "roles, 1 worker", "roles, 2 workers", "kill test, 2 workers"
    }  # fmt: skip
    for name, r in figures["runs"].items():
        assert r["failures"] == 0 and r["lost"] == 0 and r["duplicated"] == 0, (name, r)
        assert r["studies_per_min"] > 0, name
    assert figures["overhead"]["p50_ms"] > 0
    assert re.search(r"roles, 2 workers\s+1\s+[\d.]+", done.stdout)
    assert [p.name for p in tmp_path.iterdir()] == ["scaleout.json"]  # the scratch data is gone


def test_bench_disk_counts_hard_links_once(tmp_path):
    """Input 1000 bytes; processed 500 and models 100, each also in the cache through a hard
    link (as `dvc checkout --relink` leaves them), and a stale cache entry of 50 bytes."""
    files = {"data/raw/dicom/a.dcm": 1000, "data/processed/b.b2nd": 500, "models/m.pt": 100}
    for rel, size in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x" * size)
        entry = tmp_path / ".dvc/cache/files/md5" / path.name
        entry.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, entry)
    (tmp_path / ".dvc/cache/files/md5/stale").write_bytes(b"y" * 50)
    out = tmp_path / "disk.json"
    done = run(["benchmarks/bench_disk.py", "--root", tmp_path, "--out", out])
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["total"]["apparent"] == 1650
    assert figures["ratio"]["apparent"] == pytest.approx(1.65)
    assert figures["ratio"]["copies"] == pytest.approx((1600 + 1650) / 1000)
    assert "1.65 x (file bytes)" in done.stdout


@pytest.mark.parametrize(
    "text, says",
    [
        ("preprocess.no_such_key: 1\n", "no key preprocess.no_such_key in params.yaml"),
        ("- not a mapping\n", "expected a mapping of SECTION.KEY: value"),
        (None, "cannot read"),
    ],
)
def test_bench_seeds_refuses_a_bad_profile_before_any_run(tmp_path, text, says):
    profile = tmp_path / "profile.yaml"
    if text is not None:
        profile.write_text(text)
    workdir = tmp_path / "runs"
    done = run(
        ["benchmarks/bench_seeds.py", "--profile", profile, "--workdir", workdir], timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert str(profile) in done.stderr and says in done.stderr
    assert not workdir.exists()  # nothing cloned
