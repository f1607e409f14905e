"""params.yaml, its typed form (ctpipe/config.py) and dvc.yaml agree.

A stage reads params through ``params = config.load(...)`` and then only section objects:
``params.train``, ``params.inference``, ``params.base.seed``. dvc.yaml declares for each stage exactly
the sections it reads (``base`` key by key), so a changed value re-runs exactly the stages that
read it. Every field of every section is read somewhere in the package or a stage (no dead param),
and a wrong value stops a stage with a message that names the key and the value.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctpipe import config

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SECTIONS = set(config.Params.model_fields)


def loaded_names(tree: ast.AST) -> set[str]:
    """Names bound to ``config.load(...)`` in a stage script."""
    return {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and ast.unparse(node.value.func) == "config.load"
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def sections_read(name: str) -> set[str]:
    """What a stage script reads of its params: ``section`` or ``base.key``."""
    tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
    names = loaded_names(tree)
    reads = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or node.attr not in SECTIONS:
            continue
        owner = node.value
        loaded = isinstance(owner, ast.Name) and owner.id in names
        direct = isinstance(owner, ast.Call) and ast.unparse(owner.func) == "config.load"
        if loaded or direct:
            reads.add(node.attr)
    for node in ast.walk(tree):  # base is declared key by key: params.base.seed
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "base"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id in names
        ):
            reads.add(f"base.{node.attr}")
    reads.discard("base")
    return reads


@pytest.mark.parametrize("name", list(DVC["stages"]))
def test_stage_declares_exactly_the_sections_it_reads(name):
    declared = set(DVC["stages"][name].get("params", []))
    reads = sections_read(name)
    assert reads, f"stages/{name}.py reads no params through config.load"
    assert declared == reads, (
        f"{name}: dvc.yaml declares {sorted(declared - reads)} it never reads and misses "
        f"{sorted(reads - declared)}"
    )


def test_params_yaml_is_valid_and_every_field_is_in_it():
    params = config.load(ROOT / "params.yaml")
    for section in SECTIONS:
        model = type(getattr(params, section))
        required = {k for k, f in model.model_fields.items() if f.is_required()}
        assert required == set(model.model_fields), f"{section}: a field with a default hides"


def _fields(model: type[config.Section], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, config.Section):
            out.update(_fields(kind, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = key
    return out


def test_every_param_is_read_somewhere():
    """A key no code reads is a dead param: each field name appears as an attribute read outside
    ctpipe/config.py (``cfg.lr``, ``params.inference.views``)."""
    attributes = set()
    for path in [*ROOT.glob("stages/*.py"), *ROOT.glob("ctpipe/**/*.py")]:
        if path.name == "config.py" and path.parent.name == "ctpipe":
            continue
        tree = ast.parse(path.read_text())
        attributes |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    dead = {
        f"{section}.{dotted}"
        for section in SECTIONS
        for dotted, key in _fields(config.Params.model_fields[section].annotation).items()
        if key not in attributes
    }
    assert not dead, f"params nobody reads: {sorted(dead)}"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.lr", "fast", "train.lr"),
        ("train.amp", "false", "train.amp"),  # a quoted false is not a bool
        ("train.views", ["axial", "oblique"], "train.views.1"),
        ("postprocess.threshold", "maybe", "postprocess.threshold"),
        ("preprocess.split.val_fraction", 1.5, "preprocess.split.val_fraction"),
        ("ingest.synthetic.matrix", 8, "ingest.synthetic.matrix"),
        ("quantize.typo", 1, "quantize.typo"),
    ],
)
def test_a_wrong_value_names_the_key_and_the_value(tmp_path, key, value, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    *path, last = key.split(".")
    section = params
    for part in path:
        section = section[part]
    section[last] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(config.ConfigError) as caught:
        config.load(tmp_path / "params.yaml")
    text = str(caught.value)
    assert message in text and str(tmp_path / "params.yaml") in text
    assert repr(value) in text or isinstance(value, list)


def test_a_missing_section_is_named(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["evaluate"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(config.ConfigError, match="evaluate"):
        config.load(tmp_path / "params.yaml")


def test_a_stage_stops_on_a_wrong_value(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["preprocess"]["interpolation"] = "cubic"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(
        [sys.executable, "stages/preprocess.py", tmp_path / "in", tmp_path / "out"]
        + ["--params", tmp_path / "params.yaml", "--metrics", tmp_path / "m.json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "preprocess.interpolation" in done.stderr and "'cubic'" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", list(DVC["stages"]))
def test_seed_declared_iff_used(name):
    """``base.seed`` is declared exactly by the stages whose code reads it."""
    uses = "base.seed" in sections_read(name)
    declared = "base.seed" in DVC["stages"][name].get("params", [])
    assert uses == declared, f"{name}: seed used={uses}, declared={declared}"


def _imported_modules(path: Path) -> set[Path]:
    """Files of the ctpipe modules ``path`` imports (``from ctpipe.x import y``: x, and y if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctpipe"):
            for mod in [node.module] + [f"{node.module}.{a.name}" for a in node.names]:
                base = ROOT / mod.replace(".", "/")
                for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                    if candidate.is_file():
                        found.add(candidate)
    return found


def test_every_stage_script_and_its_imports_are_deps():
    for name, stage in DVC["stages"].items():
        script = f"stages/{name}.py"
        assert stage["cmd"].startswith(f"python {script} "), name
        deps = {ROOT / str(d) for d in stage["deps"]}
        assert ROOT / script in deps
        todo, seen = [ROOT / script], set()
        while todo:  # every ctpipe module imported, directly or through another ctpipe module
            for path in _imported_modules(todo.pop()) - seen:
                seen.add(path)
                todo.append(path)
        # a package's __init__ is covered by its folder or, when it only documents, may be left out
        missing = {
            str(p.relative_to(ROOT))
            for p in seen
            if p not in deps and not set(p.parents) & deps and p.name != "__init__.py"
        }
        assert not missing, f"{name} imports modules that are not deps: {sorted(missing)}"


def _flatten(params: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def test_params_reference_documents_every_param_with_its_current_value():
    """docs/params.md (``| `a.b` | `value` | meaning |``) lists every leaf of params.yaml with the
    value it has now, and nothing else, and is what scripts/params_table.py makes of params.yaml."""
    text = (ROOT / "docs" / "params.md").read_text()
    made = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "params_table.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert text == made, "docs/params.md is stale: python scripts/params_table.py > docs/params.md"
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if line.startswith("| `") and len(cells) >= 3 and cells[1].startswith("`"):
            rows[cells[0].strip("| `")] = cells[1].strip("`")
    sections = {
        k for k, v in rows.items() if v == "(section)"
    }  # nested sections have a row of their own
    rows = {k: yaml.safe_load(v) for k, v in rows.items() if k not in sections}
    flat = _flatten(PARAMS)
    assert all(any(k.startswith(f"{s}.") for k in flat) for s in sections), sections
    assert set(rows) == set(flat), (
        f"missing {sorted(set(flat) - set(rows))}, extra {sorted(set(rows) - set(flat))}"
    )
    stale = {k: (rows[k], v) for k, v in flat.items() if rows[k] != v}
    assert not stale, f"docs/params.md values differ from params.yaml (doc, params.yaml): {stale}"
