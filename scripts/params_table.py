"""Print the params reference (a Markdown table) from ``params.yaml`` and its comments.

Every key of ``params.yaml`` is documented by the comment on its line; this script turns them into
``| `section.key` | `value` | meaning |`` rows, one per leaf (a nested section gets a row of its
own), so the reference never drifts from the file (``tests/test_params_declared.py`` checks it).

Usage::

    python scripts/params_table.py > docs/params.md
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

LINE = re.compile(
    r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<value>[^#]*?)\s*(?:#\s*(?P<comment>.*))?$"
)


def _flow(value: object) -> str:
    """A value as one line of YAML, as it would be written in params.yaml."""
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10**6)
        .strip()
        .removesuffix("...")
        .strip()
    )


def rows(text: str) -> list[tuple[str, str, str]]:
    """``(dotted key, value as YAML, comment)`` of every key, in file order (a value may continue
    on the lines below its key)."""
    params = yaml.safe_load(text)
    out, stack = [], []
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        depth = len(m["indent"]) // 2
        stack[depth:] = [m["key"]]
        value = params
        for key in stack:
            value = value[key]
        comment = (m["comment"] or "").replace("|", "\\|")
        shown = "(section)" if isinstance(value, dict) else _flow(value)
        out.append((".".join(stack), shown, comment))
    return [r for r in out if "." in r[0]]  # top-level section names are headings, not rows


HEADER = """# Params reference

Generated from the comments of `params.yaml` by `python scripts/params_table.py > docs/params.md`
(a test fails when the two differ). Every tunable value is in `params.yaml`, one section per stage
plus `base`; `ctpipe/config.py` checks types, ranges and choices when a stage starts, and `dvc.yaml`
declares for each stage the sections it reads, so changing a param re-runs exactly those stages.
The `inference` section is shared by the stages that run the network on whole volumes. `postprocess` holds search grids,
not chosen values: the values are chosen on the validation split after every training and written to
`models/postprocessing.json` ([post-processing](postprocessing.md)).

"""


def table(text: str) -> str:
    lines = [HEADER.rstrip("\n"), "", "| param | default | meaning |", "|---|---|---|"]
    for key, value, comment in rows(text):
        lines.append(f"| `{key}` | `{value}` | {comment} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml"
    )
    args = parser.parse_args(argv)
    sys.stdout.write(table(args.params.read_text(encoding="utf-8")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
