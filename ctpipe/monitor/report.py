"""The drift report: ``report.json`` (every feature's test), ``report.md`` (a table, then a plot
per drifting feature) and the plots (``<feature>.png``: reference against window)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ctpipe.fileio import write_json
from ctpipe.monitor.drift import values

# Figures are made with matplotlib's object-oriented API, not pyplot: no backend is chosen (and no
# global state touched) by importing this module, and a figure is freed with its last reference.


def plot(result: dict, reference: list[dict], window: list[dict], path: Path) -> None:
    fig = Figure(figsize=(5, 3.2), dpi=110)
    ax = fig.subplots()
    feature = result["feature"]
    if result["kind"] == "numeric":
        a, b = (
            np.asarray(values(reference, feature), float),
            np.asarray(values(window, feature), float),
        )
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 25)
        ax.hist(a, bins, density=True, alpha=0.55, label=f"reference (n={a.size})")
        ax.hist(b, bins, density=True, alpha=0.55, label=f"window (n={b.size})")
        ax.set_xlabel(feature)
        ax.set_title(
            f"{feature}: KS p={result['p_value']:.1e}, PSI {result['psi']:.2f}", fontsize=9
        )
    else:
        cats = sorted(set(result["reference_share"]) | set(result["window_share"]))
        x = np.arange(len(cats))
        ax.bar(x - 0.2, [result["reference_share"].get(c, 0) for c in cats], 0.4, label="reference")
        ax.bar(x + 0.2, [result["window_share"].get(c, 0) for c in cats], 0.4, label="window")
        ax.set_xticks(x, cats, rotation=20, fontsize=7)
        ax.set_ylabel("share")
        ax.set_title(
            f"{feature}: chi2 p={result['p_value']:.1e}, JS {result['jensen_shannon']:.2f}",
            fontsize=9,
        )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def overview(results: list[dict], reference: list[dict], window: list[dict], path: Path) -> None:
    """Every numeric feature at a glance: reference (grey) and window (colour) distributions,
    drifting ones titled in red."""
    numeric = [r for r in results if r["kind"] == "numeric"][:16]
    if not numeric:
        return
    cols = 4
    rows = -(-len(numeric) // cols)
    fig = Figure(figsize=(12, 2.3 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, r in zip(axes.ravel(), numeric):
        a = np.asarray(values(reference, r["feature"]), float)
        b = np.asarray(values(window, r["feature"]), float)
        lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 20)
        ax.hist(a, bins, density=True, color="0.6", alpha=0.7)
        ax.hist(b, bins, density=True, color="tab:blue", alpha=0.55)
        ax.set_title(
            f"{r['feature']} (p={r['p_value']:.0e})",
            fontsize=8,
            color="tab:red" if r["drift"] else "black",
        )
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    for ax in axes.ravel()[len(numeric) :]:
        ax.axis("off")
    fig.suptitle("reference (grey) vs window (blue); red: drifting", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def size_of(result: dict) -> str:
    if result["kind"] == "numeric":
        median = f"median {result['reference_median']:.3g} -> {result['window_median']:.3g}"
        return f"PSI {result['psi']:.2f}, W {result['wasserstein']:.3g}, {median}"
    return f"JS {result['jensen_shannon']:.2f}, {result['reference_share']} -> {result['window_share']}"


def write(
    out: Path, results: list[dict], reference: list[dict], window: list[dict], meta: dict
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    drifting = [r for r in results if r["drift"]]
    summary = {
        **meta,
        "features": len(results),
        "drifting": [r["feature"] for r in drifting],
        "results": results,
    }
    write_json(out / "report.json", summary)
    lines = [
        "# Drift report",
        "",
        f"Window: {meta['window']} records; reference: {meta['reference']} records. "
        f"Flag: p < {results[0]['threshold']:.2g} (alpha {meta['alpha']} / {len(results)} features)."
        if results
        else "No feature to compare.",
        "",
        f"**Drifting: {', '.join(summary['drifting']) or 'none'}**",
        "",
        "| feature | test | p-value | size | drift |",
        "|---|---|---:|---|---|",
    ]
    for r in results:
        flag = "**yes**" if r["drift"] else "no"
        lines.append(
            f"| {r['feature']} | {r['test']} | {r['p_value']:.2e} | {size_of(r)} | {flag} |"
        )
    overview(results, reference, window, out / "overview.png")
    if results:
        lines += ["", "![every numeric feature](overview.png)"]
    for r in drifting:
        plot(r, reference, window, out / f"{r['feature']}.png")
        lines += ["", f"## {r['feature']}", "", f"![{r['feature']}]({r['feature']}.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return summary
