"""ctpipe's subpackages form layers: no two of them import each other, directly or round a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ctpipe"


def imported_modules(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """Absolute names of the ctpipe modules (or names in them) ``path`` imports, lazy imports
    inside functions included; relative imports resolved against the file's own package (its
    folders under ``root``)."""
    package = path.relative_to(root).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [base])])
            names.update(f"{base}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] == "ctpipe"}


def subpackage_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Subpackage of ``package`` -> the other subpackages its modules import."""
    graph: dict[str, set[str]] = {p.parent.name: set() for p in package.glob("*/__init__.py")}
    for name in graph:
        for path in (package / name).rglob("*.py"):
            for module in imported_modules(path, package.parent):
                parts = module.split(".")
                if len(parts) > 1 and parts[1] in graph and parts[1] != name:
                    graph[name].add(parts[1])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as the path round it (first node repeated at the end), or []."""
    state: dict[str, str] = {}  # node -> "open" while on the path, "done" once explored

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return []


def test_no_cycle_between_subpackages():
    graph = subpackage_graph()
    assert len(graph) >= 5, graph  # the glob found the subpackages
    cycle = find_cycle(graph)
    assert not cycle, "subpackages import each other: " + " -> ".join(cycle)


def test_evaluation_scores_without_post_processing_code():
    """The direction the cycle was broken in: postprocessing chooses by evaluation's metrics."""
    graph = subpackage_graph()
    assert "evaluation" in graph["postprocessing"]
    assert "postprocessing" not in graph["evaluation"]


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
        ({"a": {"b", "c"}, "b": {"c"}, "c": {"d"}, "d": {"a"}}, ["a", "b", "c", "d", "a"]),
    ],
)
def test_find_cycle_finds_a_loop_of_any_length(graph, cycle):
    assert find_cycle(graph) == cycle


def test_the_cycle_this_test_was_written_for_is_found(tmp_path):
    """evaluation.overlap imported postprocessing.candidates while postprocessing.choose imported
    evaluation (the layout before this test)."""
    for name, code in (
        ("evaluation", "from ctpipe.postprocessing import x"),
        ("postprocessing", ""),
    ):
        (tmp_path / "ctpipe" / name).mkdir(parents=True)
        (tmp_path / "ctpipe" / name / "__init__.py").write_text("")
        (tmp_path / "ctpipe" / name / "m.py").write_text(code)
    (tmp_path / "ctpipe" / "postprocessing" / "choose.py").write_text(
        "from ctpipe.evaluation import luna16\n"
    )
    graph = subpackage_graph(tmp_path / "ctpipe")
    assert find_cycle(graph) == ["evaluation", "postprocessing", "evaluation"]


def test_relative_and_lazy_imports_count(tmp_path):
    (tmp_path / "ctpipe" / "b").mkdir(parents=True)
    module = tmp_path / "ctpipe" / "b" / "m.py"
    module.write_text(
        "import numpy\n\ndef f():\n    from ..a import x\n    import ctpipe.c.y\n\nfrom . import z\n"
    )
    assert imported_modules(module, tmp_path) == {"ctpipe.a.x", "ctpipe.c.y", "ctpipe.b.z"}
