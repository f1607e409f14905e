"""The fuzz corpus (``scripts/make_fuzz_corpus.py``) through ingest, anonymize and predict, each
run as a user runs it (a process): documented exit status, no traceback, every input entry
accounted for with a reason, no planted identifying value in a pushable byte, and the valid
series still processed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KEY = "fuzz-test-secret-key-0123456789-abcdefXYZ"
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, write_tiny_cohort) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fuzz")
    write_tiny_cohort(root / "base", n=1, seed=7)
    subprocess.run(
        [sys.executable, "scripts/make_fuzz_corpus.py", root / "base", root / "corpus"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return root / "corpus", json.loads((root / "corpus.json").read_text(encoding="utf-8"))


def run(args: list, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=900,
    )


def entries(corpus: dict) -> dict[str, str]:
    """Every corpus entry -> its family."""
    return {f: name for name, fam in corpus["families"].items() for f in fam["files"]}


def test_corpus_covers_the_families(corpus):
    _, meta = corpus
    assert len(meta["families"]) >= 30  # the families of issue 15 and this project's own


def test_ingest_accounts_for_every_entry(corpus, tmp_path):
    folder, meta = corpus
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"].update(
        source="dicom", source_dir=str(folder), annotations=str(tmp_path / "annotations.csv")
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "raw"
    done = run(
        ["stages/ingest.py", out, "--params", tmp_path / "params.yaml", "--metrics", tmp_path / "m"]
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    status = dict(zip(manifest["path"], manifest["status"]))
    assert set(entries(meta)) <= set(status)  # nothing vanished
    skipped = manifest[manifest["status"] != "ok"]
    assert (skipped["reason"].str.len() > 0).all()
    for name, fam in meta["families"].items():
        states = {status[f] for f in fam["files"]}
        if fam["expect"] == "usable":
            assert states == {"ok"}, (name, manifest[manifest["path"].isin(fam["files"])])
        elif fam["expect"] == "unusable":
            assert "ok" not in states, name


def test_anonymize_accounts_for_every_entry_and_leaks_nothing(corpus, tmp_path):
    folder, meta = corpus
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, private = tmp_path / "anon", tmp_path / "private"
    done = run(
        [
            "stages/anonymize.py",
            folder,
            out,
            "--private-dir",
            private,
            "--params",
            tmp_path / "params.yaml",
            "--metrics",
            tmp_path / "anonymize.json",
        ],
        env={"CTPIPE_DEID_KEY": KEY},
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    quarantined = pd.read_csv(private / "quarantine.csv", keep_default_na=False)
    audit = pd.read_csv(out / "audit.csv")
    metrics = json.loads((tmp_path / "anonymize.json").read_text())
    assert metrics["leaks_found"] == 0
    assert metrics["files_in"] == len(entries(meta))  # every entry, once
    assert len(audit) + len(quarantined) == metrics["files_in"]
    assert set(quarantined["path"]) <= set(entries(meta))
    assert (quarantined["reason"].str.len() > 0).all()
    for path in meta["families"]["valid"]["files"]:
        assert path not in set(quarantined["path"])
    pushable = [p for p in out.rglob("*") if p.is_file()]
    assert len([p for p in pushable if p.suffix == ".dcm"]) == len(audit)
    # numbers as whole numbers (a 4-digit Study ID occurs inside random UIDs), text anywhere
    needles = [
        re.compile(
            re.escape(v.encode()) if re.search(r"[^\d ]", v) else rb"(?<!\d)%s(?!\d)" % v.encode()
        )
        for v in meta["planted"]
    ]
    for path in pushable:
        data = path.read_bytes().lower() + b"\n" + str(path.relative_to(out)).lower().encode()
        found = [n.pattern for n in needles if n.search(data)]
        assert not found, (path, found)


def test_predict_accounts_for_every_entry(corpus, tiny_package, tmp_path):
    folder, meta = corpus
    out = tmp_path / "pred"
    done = run(["-m", "ctpipe.predict", folder, out, "--package", tiny_package])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    failed = {u: s for u, s in summary["series"].items() if s["status"] == "failed"}
    assert not failed  # every bad input is a refusal or a skip with a reason
    counted = sum(s["files"] for s in summary["series"].values()) + len(summary["unused_files"])
    assert counted == len(entries(meta))
    assert all(s.get("reason") for s in summary["series"].values() if s["status"] != "predicted")
    by_series = {}
    for name, fam in meta["families"].items():
        if name == "special_entries":  # reading a FIFO would block
            continue
        for f in fam["files"]:
            try:
                uid = pydicom.dcmread(folder / f, stop_before_pixels=True).SeriesInstanceUID
            except Exception:  # noqa: BLE001 - the damaged and special entries
                continue
            by_series.setdefault(name, set()).add(str(uid))
    for name, fam in meta["families"].items():
        states = {summary["series"].get(u, {}).get("status") for u in by_series.get(name, ())}
        if fam["expect"] == "usable":
            assert states == {"predicted"}, (name, states)
        elif fam["expect"] == "unusable":
            assert "predicted" not in states, (name, states)
    for uid in by_series["valid"]:
        assert (out / uid / "seg.dcm").is_file() and (out / uid / "sr.dcm").is_file()
