"""Every param a stage reads is declared for it in dvc.yaml, and every declared param is read.

A stage reads its own section of params.yaml (``stage_params(<stage>)``) plus ``base.seed``. A key
counts as read only where it is read from that dict: the dict is followed (statically) from the
``cfg, seed = stage_params(...)`` of the stage script through assignments, tuples, ``partial`` and
calls into the functions of the stage script and of the package modules listed in its deps
(:class:`ConfigReads`). ``threshold`` or ``workers`` subscripted on any other dict does not count.
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


def stage_sources(stage: dict) -> list[Path]:
    """The Python files among a stage's deps: files, and every module of a package folder."""
    paths = [ROOT / d for d in stage["deps"]]
    return [p for p in paths if p.suffix == ".py"] + [
        m for p in paths if p.is_dir() for m in sorted(p.rglob("*.py"))
    ]


CONFIG = "config"  # taint of a stage's params (its ``stage_params`` dict, or a part of it)
Taint = str | frozenset | None  # CONFIG, a tuple with CONFIG at these positions, or nothing


class Module:
    """One source file: its functions (``f``, ``Class.f``), classes, imports and constants."""

    def __init__(self, path: Path):
        self.tree = ast.parse(path.read_text(), str(path))
        self.functions: dict[str, tuple[ast.FunctionDef, str | None]] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        self.imports: dict[str, str] = {}  # local name -> "module" or "module:attribute"
        self.constants: dict[str, set[str]] = {}  # NAME = ("a", "b") at module level
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef):
                self.functions[node.name] = (node, None)
            elif isinstance(node, ast.ClassDef):
                self.classes[node.name] = node
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        self.functions[f"{node.name}.{item.name}"] = (item, node.name)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.imports[a.asname or a.name] = f"{node.module}:{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    self.imports[a.asname or a.name] = a.name
            elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                if isinstance(node.targets[0], ast.Name):
                    self.constants[node.targets[0].id] = literal_strings(node.value)

    def fields(self, cls: str) -> set[str]:
        """Field names of a dataclass defined here (empty for any other class)."""
        node = self.classes.get(cls)
        if node is None or not any("dataclass" in ast.unparse(d) for d in node.decorator_list):
            return set()
        return {
            f.target.id
            for f in node.body
            if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)
        }


def literal_strings(node: ast.AST) -> set[str]:
    """The strings of a literal tuple, list, set or dict keys; empty for anything else."""
    items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", [])
    if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
        return {n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return set()


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


class ConfigReads:
    """The keys a stage reads from its params, following them from ``stage_params(...)`` through
    assignments, tuples and calls into the functions of the stage's own source files (functions,
    ``Class.method``, and ``obj.method`` where a single class of the caller's module has it).

    A key counts only where it is read from the params: ``cfg["k"]``, ``cfg.get("k")``,
    ``cfg["section"]["k"]``, ``cfg[k] for k in ("a", "b")``, a dataclass built with ``**cfg`` or
    iterating its own ``__dataclass_fields__``. The same name read from any other dict does not.
    """

    def __init__(self, sources: list[Path]):
        self.modules = {module_name(p): Module(p) for p in sources}
        self.keys: set[str] = set()
        self.seen: set[tuple] = set()

    def run(self, script: Path) -> set[str]:
        name = module_name(script)
        for qualname in self.modules[name].functions:
            self.visit(name, qualname, {})
        return self.keys

    def visit(self, mod: str, qualname: str, env: dict[str, Taint]) -> None:
        memo = (mod, qualname, frozenset(env.items()))
        if memo in self.seen:
            return
        self.seen.add(memo)
        func, owner = self.modules[mod].functions[qualname]
        nodes = list(ast.walk(func))
        env, loops = dict(env), {}
        for n in nodes:
            if isinstance(n, (ast.For, ast.comprehension)) and isinstance(n.target, ast.Name):
                loops[n.target.id] = self.iterated(mod, owner, n.iter)
        size = -1
        while size != len(env):  # flow-insensitive: taint only ever grows
            size = len(env)
            for n in nodes:
                if isinstance(n, ast.Assign):
                    for target in n.targets:
                        self.assign(target, n.value, env)
                elif isinstance(n, (ast.AnnAssign, ast.NamedExpr)) and n.value is not None:
                    self.assign(n.target, n.value, env)
        for n in nodes:
            if isinstance(n, ast.Subscript) and taint(n.value, env) == CONFIG:
                self.keys |= key_names(n.slice, loops)
            elif isinstance(n, ast.Call):
                f = n.func
                if isinstance(f, ast.Attribute) and f.attr in ("get", "pop", "setdefault"):
                    if taint(f.value, env) == CONFIG and n.args:
                        self.keys |= key_names(n.args[0], loops)
                        continue
                self.call(mod, n, env)

    def assign(self, target: ast.AST, value: ast.AST, env: dict) -> None:
        if isinstance(target, ast.Name):
            t = taint(value, env)
            if t is not None:
                env.setdefault(target.id, t)
        elif isinstance(target, (ast.Tuple, ast.List)):
            if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts):
                for t_elt, v_elt in zip(target.elts, value.elts):
                    self.assign(t_elt, v_elt, env)
            elif isinstance(t := taint(value, env), frozenset):
                for i in t:
                    if i < len(target.elts) and isinstance(target.elts[i], ast.Name):
                        env.setdefault(target.elts[i].id, CONFIG)

    def iterated(self, mod: str, owner: str | None, node: ast.AST) -> set[str]:
        """Strings a loop over ``node`` yields, where they are known statically."""
        if isinstance(node, ast.Call) and node.args and ast.unparse(node.func) in ITERATORS:
            return self.iterated(mod, owner, node.args[0])
        if isinstance(node, ast.Name):
            return self.modules[mod].constants.get(node.id, set())
        if isinstance(node, ast.Attribute) and node.attr == "__dataclass_fields__":
            cls = owner if ast.unparse(node.value) in ("cls", "self") else ast.unparse(node.value)
            return self.modules[mod].fields(cls or "")
        return literal_strings(node)

    def resolve(self, mod: str, node: ast.AST) -> tuple[str, str, int] | None:
        """(module, function or ``Class.method``, parameters bound already) of a callee."""
        m = self.modules[mod]
        if isinstance(node, ast.Name):
            if node.id in m.functions or node.id in m.classes:
                return mod, node.id, 0
            target = m.imports.get(node.id, "")
            if ":" in target:
                other, name = target.split(":")
                if f"{other}.{name}" in self.modules:  # from package import module
                    return f"{other}.{name}", "", 0
                if other in self.modules:  # from module import function
                    return self.resolve(other, ast.Name(name))
            return (target, "", 0) if target in self.modules else None
        if isinstance(node, ast.Attribute) and (base := self.resolve(mod, node.value)):
            other, name, _ = base
            if not name and node.attr in self.modules[other].functions:
                return other, node.attr, 0  # module.function
            method = f"{name}.{node.attr}"
            if name in self.modules[other].classes and method in self.modules[other].functions:
                func = self.modules[other].functions[method][0]
                static = any(ast.unparse(d) == "staticmethod" for d in func.decorator_list)
                return other, method, 0 if static else 1  # Class.classmethod(...): cls bound
        if isinstance(node, ast.Attribute):  # obj.method(...): a method of a class defined here
            methods = [q for q in m.functions if q.endswith(f".{node.attr}")]
            if len(methods) == 1:
                return mod, methods[0], 1
        return None

    def call(self, mod: str, node: ast.Call, env: dict) -> None:
        func, args = node.func, list(node.args)
        if ast.unparse(func) in ("partial", "functools.partial") and args:
            func, args = args[0], args[1:]
        found = self.resolve(mod, func)
        if found is None or not found[1]:
            return
        other, qualname, bound = found
        if qualname in self.modules[other].classes:  # a dataclass built from the params
            if any(k.arg is None and taint(k.value, env) == CONFIG for k in node.keywords):
                self.keys |= self.modules[other].fields(qualname)
            return
        params = self.modules[other].functions[qualname][0].args
        names = [a.arg for a in params.posonlyargs + params.args][bound:]
        callee: dict[str, Taint] = {}
        for i, arg in enumerate(args):
            if isinstance(arg, ast.Starred):  # f(*pack): the pack's positions from here on
                t = taint(arg.value, env)
                for j in t if isinstance(t, frozenset) else ():
                    if i + j < len(names):
                        callee[names[i + j]] = CONFIG
                break
            if i < len(names) and (t := taint(arg, env)) is not None:
                callee[names[i]] = t
        for kw in node.keywords:
            t = taint(kw.value, env)
            if kw.arg is None and t == CONFIG:  # f(**cfg): every parameter is a key
                self.keys |= set(names) | {a.arg for a in params.kwonlyargs}
            elif kw.arg is not None and t is not None:
                callee[kw.arg] = t
        if callee:
            self.visit(other, qualname, callee)


ITERATORS = ("sorted", "list", "tuple", "set")


def taint(node: ast.AST, env: dict[str, Taint]) -> Taint:
    """CONFIG if ``node`` evaluates to the params (or a part of them), a frozenset of positions
    for a tuple holding them, else None."""
    if isinstance(node, ast.Name):
        return env.get(node.id)
    if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("stage_params"):
        return frozenset({0})  # (cfg, seed)
    if isinstance(node, ast.Subscript):
        t = taint(node.value, env)
        if t == CONFIG:
            return CONFIG
        index = node.slice.value if isinstance(node.slice, ast.Constant) else None
        return CONFIG if isinstance(t, frozenset) and index in t else None
    if isinstance(node, ast.Call):
        if ast.unparse(node.func) == "dict" and node.args:
            return CONFIG if taint(node.args[0], env) == CONFIG else None
        if isinstance(node.func, ast.Attribute) and node.func.attr == "copy":
            return CONFIG if taint(node.func.value, env) == CONFIG else None
        return None
    if isinstance(node, ast.Dict):
        spread = (v for k, v in zip(node.keys, node.values) if k is None)
        return CONFIG if any(taint(v, env) == CONFIG for v in spread) else None
    if isinstance(node, (ast.Tuple, ast.List)):
        where = frozenset(i for i, e in enumerate(node.elts) if taint(e, env) == CONFIG)
        return where or None
    if isinstance(node, ast.IfExp):
        return taint(node.body, env) or taint(node.orelse, env)
    if isinstance(node, ast.BoolOp):
        return next((t for v in node.values if (t := taint(v, env)) == CONFIG), None)
    return None


def key_names(node: ast.AST, loops: dict[str, set[str]]) -> set[str]:
    """The key(s) a subscript or ``.get`` argument names: a literal, or a loop over literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.Name):
        return loops.get(node.id, set())
    return set()


def config_reads(name: str) -> set[str]:
    """The keys stage ``name`` reads from its params, in its script and its Python deps."""
    script = ROOT / "stages" / f"{name}.py"
    return ConfigReads(stage_sources(DVC["stages"][name])).run(script)


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


SHARED = {
    "inference"
}  # sections several stages read, merged into theirs by stage_params(shared=...)


@pytest.mark.parametrize("name", list(DVC["stages"]))
def test_stage_params_declared_and_read(name):
    stage = DVC["stages"][name]
    decl = declared(stage)
    reads = config_reads(name)
    sections = [name] + sorted({d.split(".")[0] for d in decl} & SHARED)  # whole, or key by key
    foreign = {d for d in decl if d.split(".")[0] not in (*sections, "base")}
    assert not foreign, f"{name} declares params of other stages: {sorted(foreign)}"
    for sec in sections:
        section = PARAMS[sec]
        whole = sec in decl
        declared_keys = (
            set(section) if whole else {d.split(".", 1)[1] for d in decl if d.startswith(f"{sec}.")}
        )
        unread = {k for k in declared_keys if k not in reads or not leaves(section[k]) <= reads}
        assert not unread, f"{name} declares {sec} params it never reads: {sorted(unread)}"
        undeclared = {k for k in section if k in reads} - declared_keys
        assert not undeclared, (
            f"{name} reads {sec} params it does not declare: {sorted(undeclared)}"
        )
    section = PARAMS[name]
    own = (
        set(section)
        if name in decl
        else {d.split(".", 1)[1] for d in decl if d.startswith(f"{name}.")}
    )
    assert set(section) <= own, (
        f"params.yaml keys of {name} nobody reads: {sorted(set(section) - own)}"
    )


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
    uses = any(
        isinstance(n, ast.Name) and n.id == "seed" and isinstance(n.ctx, ast.Load)
        for n in ast.walk(tree)
    )
    assert uses == ("base.seed" in declared(stage)), (
        f"{name}: seed used={uses}, declared={'base.seed' in declared(stage)}"
    )


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
    assert not stale, f"README values differ from params.yaml (README, params.yaml): {stale}"
