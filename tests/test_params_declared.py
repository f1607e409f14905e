"""Every param a stage reads is declared for it in dvc.yaml, and every declared param is read.

A stage reads its own section of params.yaml (``stage_params(<stage>)``) plus ``base.seed``. A key
counts as read when its name appears as a subscript or ``.get`` literal (``cfg["lr"]``,
``cfg.get("lr")``), or as a field of a dataclass (options built with ``Options(**cfg_subset)``), in
the stage script or one of the package modules listed in its deps.
Nested sections (``ingest.synthetic``, ``preprocess.split``) are checked leaf by leaf.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def key_literals(paths: list[Path]) -> set[str]:
    """String constants used as ``x["key"]`` or ``x.get("key")``, and dataclass field names."""
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and any(
                    "dataclass" in ast.unparse(d) for d in node.decorator_list):
                found |= {f.target.id for f in node.body if isinstance(f, ast.AnnAssign)
                          and isinstance(f.target, ast.Name)}
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                found.add(node.slice.value)
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "get" and node.args and isinstance(node.args[0], ast.Constant)):
                found.add(node.args[0].value)
    return {k for k in found if isinstance(k, str)}


def stage_sources(stage: dict) -> list[Path]:
    return [ROOT / d for d in stage["deps"] if str(d).endswith(".py")]


def declared(stage: dict) -> set[str]:
    keys: set[str] = set()
    for entry in stage.get("params", []):
        keys |= {entry} if isinstance(entry, str) else {k for v in entry.values() for k in v}
    return keys


def leaves(value) -> set[str]:
    """Names of the nested keys of a dict-valued param (empty for a scalar or list)."""
    if not isinstance(value, dict):
        return set()
    return {k for k, v in value.items()} | {n for v in value.values() for n in leaves(v)}


SHARED = {"inference"}  # sections several stages read, merged into theirs by stage_params(shared=...)


@pytest.mark.parametrize("name", list(DVC["stages"]))
def test_stage_params_declared_and_read(name):
    stage = DVC["stages"][name]
    decl = declared(stage)
    reads = key_literals(stage_sources(stage))
    sections = [name] + sorted({d.split(".")[0] for d in decl} & SHARED)  # whole, or key by key
    foreign = {d for d in decl if d.split(".")[0] not in (*sections, "base")}
    assert not foreign, f"{name} declares params of other stages: {sorted(foreign)}"
    for sec in sections:
        section = PARAMS[sec]
        whole = sec in decl
        declared_keys = set(section) if whole else {d.split(".", 1)[1] for d in decl if d.startswith(f"{sec}.")}
        unread = {k for k in declared_keys if k not in reads or not leaves(section[k]) <= reads}
        assert not unread, f"{name} declares {sec} params it never reads: {sorted(unread)}"
        undeclared = {k for k in section if k in reads} - declared_keys
        assert not undeclared, f"{name} reads {sec} params it does not declare: {sorted(undeclared)}"
    section = PARAMS[name]
    own = set(section) if name in decl else {d.split(".", 1)[1] for d in decl if d.startswith(f"{name}.")}
    assert set(section) <= own, f"params.yaml keys of {name} nobody reads: {sorted(set(section) - own)}"


def test_shared_sections_read_through_stage_params():
    """A stage declaring a shared section must merge it in (stage_params(..., shared=(...)))."""
    for name, stage in DVC["stages"].items():
        code = (ROOT / "stages" / f"{name}.py").read_text()
        for sec in SHARED & declared(stage):
            assert f'shared=("{sec}",)' in code, f"{name} declares {sec} but does not read it"


@pytest.mark.parametrize("name", list(DVC["stages"]))
def test_seed_declared_iff_used(name):
    """``base.seed`` is declared exactly by the stages whose code uses the seed."""
    stage = DVC["stages"][name]
    script = ROOT / "stages" / f"{name}.py"
    tree = ast.parse(script.read_text())
    uses = any(isinstance(n, ast.Name) and n.id == "seed" and isinstance(n.ctx, ast.Load) for n in ast.walk(tree))
    assert uses == ("base.seed" in declared(stage)), f"{name}: seed used={uses}, declared={'base.seed' in declared(stage)}"


def test_every_stage_script_and_its_imports_are_deps():
    for name, stage in DVC["stages"].items():
        script = f"stages/{name}.py"
        assert stage["cmd"].startswith(f"python {script} "), name
        deps = set(map(str, stage["deps"]))
        assert script in deps
        todo, seen = [ROOT / script], set()
        while todo:  # every ctpipe module imported, directly or through another ctpipe module
            tree = ast.parse(todo.pop().read_text())
            for node in ast.walk(tree):
                mods = []
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctpipe"):
                    mods = [node.module] + ([f"ctpipe.{a.name}" for a in node.names] if node.module == "ctpipe" else [])
                for mod in mods:
                    path = ROOT / (mod.replace(".", "/") + ".py")
                    if path.is_file() and path not in seen:
                        seen.add(path)
                        todo.append(path)
        missing = {str(p.relative_to(ROOT)) for p in seen} - deps
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
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "params_table.py")], capture_output=True,
                          text=True, check=True).stdout
    assert text == made, "docs/params.md is stale: python scripts/params_table.py > docs/params.md"
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if line.startswith("| `") and len(cells) >= 3 and cells[1].startswith("`"):
            rows[cells[0].strip("| `")] = cells[1].strip("`")
    sections = {k for k, v in rows.items() if v == "(section)"}  # nested sections have a row of their own
    rows = {k: yaml.safe_load(v) for k, v in rows.items() if k not in sections}
    flat = _flatten(PARAMS)
    assert all(any(k.startswith(f"{s}.") for k in flat) for s in sections), sections
    assert set(rows) == set(flat), f"missing {sorted(set(flat) - set(rows))}, extra {sorted(set(rows) - set(flat))}"
    stale = {k: (rows[k], v) for k, v in flat.items() if rows[k] != v}
    assert not stale, f"README values differ from params.yaml (README, params.yaml): {stale}"
