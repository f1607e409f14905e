"""Render the figures of ``README.md`` and ``docs/*.md`` from ``metrics/*.json``.

A figure that comes from a metrics file is never typed by hand: the page holds a block

    <!-- render:seeds -->
    ...
    <!-- /render:seeds -->

and this script replaces what lies between the two markers with what the renderer of that name
(``RENDERERS``) makes of the metrics files. Blocks of the same name render the same text wherever
they are. Nothing about the machine or the commit (``metrics/seeds.json``'s ``cpu`` and
``git_revision``) is rendered. ``tests/test_render_docs.py`` fails when a page is stale.

Usage::

    python scripts/render_docs.py           # rewrite the stale pages in place (make docs)
    python scripts/render_docs.py --check   # exit 1 and name every stale page
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

from ctpipe.fileio import atomic_path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"^(?P<open><!-- render:(?P<name>[\w-]+) -->\n)(?P<body>.*?)^(?P<close><!-- /render:(?P=name) -->)$",
    re.S | re.M,
)
OPENING = re.compile(r"^<!-- render:([\w-]+) -->$", re.M)  # a marker is a line of its own


class RenderError(Exception):
    """A page or a metrics file that cannot be rendered; the message names the file."""


class Metrics:
    """The JSON files of one ``metrics/`` folder, each read once, on first use."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files: dict[str, dict] = {}

    def __getitem__(self, name: str) -> dict:
        if name not in self._files:
            path = self.folder / f"{name}.json"
            try:
                self._files[name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise RenderError(f"{path}: cannot be read as JSON ({e})") from e
        return self._files[name]

    def get(self, name: str, *keys: str):
        """``metrics/<name>.json``'s value at ``keys``; a missing key names the file and the key."""
        value = self[name]
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                path = self.folder / f"{name}.json"
                raise RenderError(f"{path}: no key {'.'.join(keys)!r}")
            value = value[key]
        return value


def number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def table(header: list[str], align: str, rows: list[list[str]]) -> list[str]:
    """A Markdown table; ``align`` has one letter per column, ``l`` or ``r``."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule] + ["| " + " | ".join(r) + " |" for r in rows]


# (key in each run of metrics/seeds.json, what it is, decimals)
SEED_FIGURES = [
    ("dice", "test Dice (mean over the cases with nodules)", 3),
    ("froc_cpm", "LUNA16 CPM", 3),
    ("froc_cpm_segmentation", "LUNA16 CPM of the segmentation's score alone", 3),
    ("sensitivity_at_1fp", "sensitivity at 1 false positive per scan", 2),
    ("sensitivity", "sensitivity at the operating point", 2),
    ("fp_per_scan", "false positives per scan at the operating point", 2),
]


def seed_runs(metrics: Metrics) -> list[dict]:
    runs = metrics.get("seeds", "runs")
    if not runs:
        raise RenderError(f"{metrics.folder / 'seeds.json'}: no runs")
    for run in runs:
        for key, _, _ in SEED_FIGURES:
            if key not in run:
                raise RenderError(f"{metrics.folder / 'seeds.json'}: run without {key!r}")
    return runs


def describe(runs: list[dict]) -> str:
    """``5 runs: 3 training seeds, 2 other cohorts`` (a run that changes ``base`` is a cohort)."""
    cohorts = sum("base" in run.get("changes", {}) for run in runs)
    return f"{len(runs)} runs: {len(runs) - cohorts} training seeds, {cohorts} other cohorts"


def render_seeds(metrics: Metrics) -> list[str]:
    """Min / mean / max over the runs of the seed study (``metrics/seeds.json``)."""
    runs = seed_runs(metrics)
    rows = []
    for key, label, digits in SEED_FIGURES:
        values = [float(run[key]) for run in runs]
        low, mean, high = min(values), statistics.fmean(values), max(values)
        rows.append(
            [label, number(low, digits), f"**{number(mean, digits)}**", number(high, digits)]
        )
    return table([describe(runs), "min", "mean", "max"], "lrrr", rows)


def changes(run: dict) -> str:
    """``train.seed: 1`` from ``{"train": {"seed": 1}}``; ``default params`` when nothing changed."""

    def flat(value, prefix: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{prefix}: {value}"]
        return [item for k, v in value.items() for item in flat(v, f"{prefix}.{k}".lstrip("."))]

    return ", ".join(f"`{c}`" for c in flat(run.get("changes", {}), "")) or "default params"


POSTPROCESSING = ("threshold", "component_threshold", "shape_weight")


def render_seed_runs(metrics: Metrics) -> list[str]:
    """One row per run of the seed study, with the post-processing chosen on its validation split."""
    rows = []
    for run in seed_runs(metrics):
        chosen = run.get("postprocessing", {})
        missing = [k for k in POSTPROCESSING if k not in chosen]
        if missing:
            raise RenderError(f"{metrics.folder / 'seeds.json'}: {run['run']} lacks {missing}")
        rows.append(
            [
                run["run"],
                changes(run),
                number(run["dice"], 3),
                number(run["froc_cpm"], 3),
                number(run["sensitivity_at_1fp"], 2),
                f"{number(run['sensitivity'], 2)} / {number(run['fp_per_scan'], 2)}",
                " / ".join(f"{chosen[k]:g}" for k in POSTPROCESSING),
            ]
        )
    header = ["run", "changed", "test Dice", "CPM", "sens. at 1 FP/scan", "op. point: sens. / FP"]
    header.append("chosen on val: threshold / component / shape weight")
    return table(header, "llrrrrl", rows)


def render_seed_types(metrics: Metrics) -> list[str]:
    """Sensitivity at the operating point per nodule type over the runs of the seed study (the
    runs that report it: ``sensitivity_by_type`` of their ``evaluate.json``)."""
    runs = [run for run in seed_runs(metrics) if run.get("sensitivity_by_type")]
    if not runs:
        raise RenderError(f"{metrics.folder / 'seeds.json'}: no run reports sensitivity_by_type")
    types = sorted({t for run in runs for t in run["sensitivity_by_type"]})
    rows = []
    for kind in types:
        values = [
            float(r["sensitivity_by_type"][kind]) for r in runs if kind in r["sensitivity_by_type"]
        ]
        low, mean, high = min(values), statistics.fmean(values), max(values)
        rows.append(
            [
                kind.replace("_", "-"),
                str(len(values)),
                number(low, 2),
                f"**{number(mean, 2)}**",
                number(high, 2),
            ]
        )
    return table(["nodule type", "runs", "min", "mean", "max"], "lrrrr", rows)


def render_seed_malignancy(metrics: Metrics) -> list[str]:
    """The malignancy model's test ROC AUC beside the segmentation's diameter, per run of the seed
    study, and the mean and spread of the paired gain."""
    runs = [r for r in seed_runs(metrics) if (r.get("malignancy") or {}).get("auc") is not None]
    if not runs:
        raise RenderError(f"{metrics.folder / 'seeds.json'}: no run reports a malignancy AUC")
    rows = []
    for run in runs:
        m = run["malignancy"]

        def auc(key: str, m=m) -> str:
            low, high = m[f"{key}_ci95"]
            return f"{m[key]:.3f} ({low:.3f}-{high:.3f})"

        rows.append(
            [
                run["run"],
                f"{m['nodules']} ({m['malignant']})",
                "yes" if m.get("uses_image_figures") else "no",
                auc("auc"),
                auc("auc_diameter"),
                auc("auc_gain"),
            ]
        )
    gains = [float(r["malignancy"]["auc_gain"]) for r in runs]
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    rows.append(
        ["mean (sd) of the gain", "", "", "", "", f"{statistics.fmean(gains):+.3f} ({spread:.3f})"]
    )
    header = ["run", "found rated nodules (malignant)", "image figures used", "model AUC"]
    header += ["diameter AUC", "gain"]
    return table(header, "lrlrrr", rows)


def fp_rate(key: str) -> str:
    """``1/8`` for the FROC rate ``"0.125"``."""
    return str(Fraction(key).limit_denominator(64))


def render_evaluate(metrics: Metrics) -> list[str]:
    """The default model's figures on the test split (``metrics/evaluate.json``)."""

    def get(*keys: str):
        return metrics.get("evaluate", *keys)

    low, high = get("froc_cpm_ci95")
    froc = get("sensitivity_at_fp")
    rates = sorted(froc, key=float)
    rows = [
        ["test cases / nodules", f"{get('test_cases')} / {get('test_nodules')}"],
        ["Dice (mean over the cases with nodules) / IoU", f"{get('dice'):.3f} / {get('iou'):.3f}"],
        ["HD95 / surface Dice", f"{get('hd95_mm'):.1f} mm / {get('surface_dice'):.3f}"],
        ["LUNA16 CPM (95 % bootstrap interval)", f"{get('froc_cpm'):.3f} ({low:.3f}-{high:.3f})"],
        [
            "LUNA16 CPM of the segmentation's score alone (without the candidate classifier)",
            f"{get('froc_cpm_segmentation'):.3f}",
        ],
        [
            f"sensitivity at {', '.join(fp_rate(r) for r in rates)} FP per scan",
            ", ".join(f"{froc[r]:.2f}" for r in rates),
        ],
        [
            "operating point: sensitivity / FP per scan",
            f"{get('sensitivity'):.2f} / {get('fp_per_scan'):.2f}",
        ],
    ]
    if get("malignancy_auc") is not None:
        rows += malignancy_rows(get)
    return table(["test split (`metrics/evaluate.json`)", "value"], "lr", rows)


def malignancy_rows(get) -> list[list[str]]:
    """The malignancy model's ROC AUC beside the diameter-only baselines (evaluate.json)."""

    def auc(key: str) -> str:
        low, high = get(f"{key}_ci95")
        return f"{get(key):.3f} ({low:.3f}-{high:.3f})"

    return [
        [
            "malignancy: rated nodules found (malignant) / missed by the segmentation",
            f"{get('malignancy_nodules')} ({get('malignancy_malignant')}) / "
            f"{get('malignancy_missed')}",
        ],
        ["malignancy ROC AUC, the model (95 % bootstrap interval)", auc("malignancy_auc")],
        [
            "malignancy ROC AUC, the segmentation's diameter alone",
            auc("malignancy_auc_diameter"),
        ],
        [
            "malignancy ROC AUC, the annotated diameter alone",
            f"{get('malignancy_auc_annotated_diameter'):.3f}",
        ],
        ["the model's paired gain over the diameter", auc("malignancy_auc_gain")],
    ]


def megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def render_package(metrics: Metrics) -> list[str]:
    """fp32 against INT8 (``metrics/quantize.json``) and the export's parity (``export.json``)."""

    def q(key: str):
        return metrics.get("quantize", key)

    def e(key: str):
        return metrics.get("export", key)

    rows = [
        [
            "Dice on the test split (pooled voxels, one pass per view)",
            f"{q('dice_fp32'):.3f}",
            f"{q('dice_int8'):.3f}",
        ],
        [
            "LUNA16 CPM on the test split (one pass per view)",
            f"{q('cpm_fp32'):.3f}",
            f"{q('cpm_int8'):.3f}",
        ],
        [
            "file size",
            megabytes(e("size_bytes_model_onnx")),
            megabytes(e("size_bytes_model_int8_onnx")),
        ],
    ]
    parity = [
        f"ONNX Runtime against PyTorch (`metrics/export.json`): largest logit difference "
        f"{e('onnx_max_abs_diff'):.1e},",
        f"mask Dice {e('onnx_dice'):.3f}; INT8 against fp32: mask Dice {e('int8_vs_fp32_dice'):.3f}.",
    ]
    header = ["`model.onnx` (fp32) and `model_int8.onnx` (`metrics/quantize.json`)", "fp32", "INT8"]
    return table(header, "lrr", rows) + ["", *parity]


RENDERERS: dict[str, Callable[[Metrics], list[str]]] = {
    "seeds": render_seeds,
    "seed-runs": render_seed_runs,
    "seed-types": render_seed_types,
    "evaluate": render_evaluate,
    "seed-malignancy": render_seed_malignancy,
    "package": render_package,
}


def render_text(text: str, metrics: Metrics, page: Path) -> str:
    """``text`` with every block rendered afresh; an unknown or unclosed block names the page."""
    names = OPENING.findall(text)
    blocks = list(BLOCK.finditer(text))
    if len(blocks) != len(names):
        raise RenderError(f"{page}: a <!-- render:NAME --> block without its <!-- /render:NAME -->")
    unknown = sorted({m["name"] for m in blocks} - set(RENDERERS))
    if unknown:
        raise RenderError(f"{page}: unknown block {unknown}; known: {sorted(RENDERERS)}")

    def fill(m: re.Match) -> str:
        # blank lines around the body: a table must not run into the closing marker
        return m["open"] + "\n" + "\n".join(RENDERERS[m["name"]](metrics)) + "\n\n" + m["close"]

    return BLOCK.sub(fill, text)


def pages(root: Path) -> list[Path]:
    """The pages that may hold blocks: the README and the top-level pages of docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def stale(root: Path) -> dict[Path, str]:
    """Each page whose blocks differ from what the metrics under ``root`` give, with its new text."""
    metrics = Metrics(root / "metrics")
    out = {}
    for page in pages(root):
        text = page.read_text(encoding="utf-8")
        made = render_text(text, metrics, page)
        if made != text:
            out[page] = made
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the repository (default: this one)"
    )
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    try:
        changed = stale(args.root)
    except RenderError as e:
        print(f"render_docs: {e}", file=sys.stderr)
        return 2
    for page, text in changed.items():
        name = page.relative_to(args.root)
        if args.check:
            print(f"{name} is stale: python scripts/render_docs.py", file=sys.stderr)
        else:
            with atomic_path(page) as tmp:
                tmp.write_text(text, encoding="utf-8")
            print(f"rendered {name}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
