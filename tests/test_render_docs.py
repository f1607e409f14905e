"""The figures of README.md and docs/ are what ``scripts/render_docs.py`` makes of metrics/*.json,
the README stays a front door, and the links between the pages lead somewhere.

Real pages are only read here; every rewrite happens in a copy under ``tmp_path``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
render = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(render)

METRICS = ("seeds", "evaluate", "quantize", "export")


def blocks_removed(text: str) -> str:
    """``text`` with the body of every rendered block left out (what is typed by hand)."""
    return render.BLOCK.sub(lambda m: m["open"] + m["close"], text)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of the pages and of the metrics files they are rendered from."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    (tmp_path / "metrics").mkdir()
    for name in METRICS:
        shutil.copy(ROOT / "metrics" / f"{name}.json", tmp_path / "metrics" / f"{name}.json")
    return tmp_path


def test_pages_are_rendered_from_the_current_metrics():
    stale = [str(p.relative_to(ROOT)) for p in render.stale(ROOT)]
    assert not stale, f"stale pages {stale}: python scripts/render_docs.py (make docs)"


@pytest.mark.parametrize(
    "page, names",
    [
        ("README.md", {"seeds"}),
        ("docs/results.md", {"seeds", "seed-runs", "evaluate"}),
        ("docs/predict.md", {"package"}),
    ],
)
def test_pages_hold_their_rendered_blocks(page, names):
    found = {m["name"] for m in render.BLOCK.finditer((ROOT / page).read_text())}
    assert names <= found, f"{page} lacks the blocks {sorted(names - found)}"


def test_a_changed_metric_changes_the_rendered_pages(repo, capsys):
    path = repo / "metrics" / "seeds.json"
    seeds = json.loads(path.read_text())
    seeds["runs"][0]["dice"] = 0.1234  # the lowest Dice of the study now
    path.write_text(json.dumps(seeds))
    before = {p: p.read_text() for p in render.pages(repo)}

    assert render.main(["--root", str(repo), "--check"]) == 1
    err = capsys.readouterr().err
    assert "README.md is stale" in err and "docs/results.md is stale" in err
    assert {p: p.read_text() for p in render.pages(repo)} == before, "--check wrote a page"

    assert render.main(["--root", str(repo)]) == 0
    readme = (repo / "README.md").read_text()
    assert "| test Dice (mean over the cases with nodules) | 0.123 |" in readme
    assert (
        "| train_seed_42 | default params | 0.123 |" in (repo / "docs" / "results.md").read_text()
    )
    for page, text in before.items():  # only the blocks changed
        assert blocks_removed(page.read_text()) == blocks_removed(text), page.name
    assert render.main(["--root", str(repo), "--check"]) == 0


def test_a_changed_package_figure_changes_only_its_page(repo):
    path = repo / "metrics" / "quantize.json"
    quantize = json.loads(path.read_text())
    quantize["dice_int8"] = 0.5
    path.write_text(json.dumps(quantize))
    assert [p.name for p in render.stale(repo)] == ["predict.md"]


def test_a_missing_metric_names_its_file_and_key(repo):
    path = repo / "metrics" / "evaluate.json"
    figures = json.loads(path.read_text())
    del figures["froc_cpm"]
    path.write_text(json.dumps(figures))
    with pytest.raises(render.RenderError, match=r"evaluate\.json: no key 'froc_cpm'"):
        render.stale(repo)
    assert render.main(["--root", str(repo), "--check"]) == 2


@pytest.mark.parametrize(
    "text, reason",
    [
        ("<!-- render:nonsense -->\n<!-- /render:nonsense -->\n", "unknown block"),
        ("<!-- render:seeds -->\n| old |\n", "without its"),
        ("<!-- render:seeds -->\n<!-- /render:evaluate -->\n", "without its"),
    ],
)
def test_a_bad_block_names_its_page(repo, text, reason):
    (repo / "docs" / "broken.md").write_text(text)
    with pytest.raises(render.RenderError, match=rf"broken\.md: .*{reason}"):
        render.stale(repo)


def test_readme_is_a_front_door():
    """At most 6 KB, and nothing that dates it: no dates, commits, issue numbers or machines."""
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 6 * 1024, f"README.md is {len(text.encode())} bytes"
    assert not re.findall(r"\b20\d\d-\d\d-\d\d\b", text), "a date in README.md"
    hashes = [t for t in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search("[a-f]", t)]
    assert not hashes, f"commit ids in README.md: {hashes}"
    assert not re.findall(r"issue\s*#?\d+|#\d+\b", text, re.I), "an issue number in README.md"
    seeds = json.loads((ROOT / "metrics" / "seeds.json").read_text())
    machine = [seeds["cpu"]["model"], seeds["git_revision"][:7], "Xeon", "EPYC"]
    assert not [m for m in machine if m.lower() in text.lower()], "the environment in README.md"


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    words = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return words.replace(" ", "-")


LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")


@pytest.mark.parametrize("page", render.pages(ROOT), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_between_pages_lead_somewhere(page):
    """Every relative link names a file that exists and, with ``#anchor``, one of its headings."""
    broken = []
    for target in LINK.findall(page.read_text()):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
