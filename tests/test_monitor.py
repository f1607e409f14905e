"""Drift monitoring: a shifted synthetic cohort (thinner slices, more noise, an intensity offset,
another kernel) is flagged, a second sample of the training distribution is not, over several
seeds; the report and the records that predict writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from ctpipe import synth
from ctpipe.monitor import drift
from ctpipe.monitor.record import synthetic_features

ROOT = Path(__file__).resolve().parents[1]
SEEDS = range(5)
REFERENCE_CASES, WINDOW_CASES = 30, 15
SHIFT = {"slice_spacing_mm": (2.5,), "noise_hu": 35, "hu_offset": 40.0, "kernel": "B70f"}


def records(cohort: synth.Cohort, seed: int, n: int) -> list[dict]:
    return [synthetic_features(synth.make_case(seed, index, cohort)) for index in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_synth) -> list[dict]:
    return records(tiny_synth, 1000, REFERENCE_CASES)


@pytest.fixture(scope="module")
def windows(tiny_synth) -> dict[str, list[list[dict]]]:
    return {
        "same": [records(tiny_synth, 2000 + s, WINDOW_CASES) for s in SEEDS],
        "shifted": [records(tiny_synth.but(**SHIFT), 3000 + s, WINDOW_CASES) for s in SEEDS],
    }


def test_shifted_cohort_flagged_training_distribution_not(reference, windows):
    alarms = [
        [r["feature"] for r in drift.compare(reference, w) if r["drift"]] for w in windows["same"]
    ]
    detected = [
        {r["feature"] for r in drift.compare(reference, w) if r["drift"]}
        for w in windows["shifted"]
    ]
    false_alarm_rate = sum(bool(a) for a in alarms) / len(alarms)
    assert false_alarm_rate <= 0.2, alarms  # alpha 0.01 per window; 5 windows
    for flagged in detected:  # every shifted window, each kind of shift
        assert {"spacing_z_mm", "slices", "kernel"} <= flagged, flagged
        assert {"body_hu_p50", "lung_hu_mean"} & flagged, flagged  # the +40 HU offset
        assert {"body_hu_std", "lung_hu_std"} & flagged, flagged  # the noise


def test_report_has_a_plot_per_drifting_feature(reference, windows, tmp_path):
    (tmp_path / "records").mkdir()
    for i, r in enumerate(windows["shifted"][0]):
        (tmp_path / "records" / f"{i:03d}.json").write_text(json.dumps(r))
    (tmp_path / "reference.json").write_text(json.dumps({"records": reference, "outputs": []}))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctpipe.monitor",
            tmp_path / "reference.json",
            tmp_path / "records",
            "--out",
            tmp_path / "report",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stderr  # something drifts
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "kernel" in summary["drifting"]
    text = (tmp_path / "report" / "report.md").read_text()
    for feature in summary["drifting"]:
        assert (tmp_path / "report" / f"{feature}.png").stat().st_size > 1000
        assert f"![{feature}]({feature}.png)" in text


def test_importing_the_report_chooses_no_matplotlib_backend():
    code = (
        "import sys, ctpipe.monitor.report; "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_predict_writes_a_record_without_phi(tiny_package, tmp_path, write_tiny_cohort):
    from ctpipe.deploy import predict

    write_tiny_cohort(tmp_path / "study", n=1, seed=12)
    out, records_dir = tmp_path / "out", tmp_path / "records"
    predict.main(
        [
            str(tmp_path / "study"),
            str(out),
            "--package",
            str(tiny_package),
            "--records",
            str(records_dir),
        ]
    )
    (path,) = list(records_dir.glob("*.json"))
    record = json.loads(path.read_text())
    first = pydicom.dcmread(next((tmp_path / "study").rglob("*.dcm")), stop_before_pixels=True)
    assert record["slices"] > 0 and record["manufacturer"] == "SYNTHETIC"
    assert record["candidates"] is not None and record["inference_seconds"] > 0
    text = path.read_text()
    for value in (
        first.SeriesInstanceUID,
        first.StudyInstanceUID,
        first.PatientID,
        str(first.PatientName),
    ):
        assert value not in text


def test_serve_exports_drift_flags_as_gauges(reference, windows, tmp_path, tiny_package):
    from prometheus_client import generate_latest
    from servekit import InProcessNode, make_cfg

    (tmp_path / "reference.json").write_text(json.dumps({"records": reference, "outputs": []}))
    raw = make_cfg(
        tmp_path,
        tiny_package,
        None,
        monitor={"reference": str(tmp_path / "reference.json"), "window": 50},
    )
    node = InProcessNode(raw)
    for i, r in enumerate(windows["shifted"][0]):
        (node.runner.records / f"{i:03d}.json").write_text(json.dumps(r))
    node.runner.check_drift()
    text = generate_latest(node.metrics.registry).decode()
    assert 'ctpipe_drift{feature="kernel"} 1.0' in text
    assert 'ctpipe_drift{feature="kvp"} 0.0' in text
    assert 'ctpipe_latest_feature{feature="spacing_z_mm"} 2.5' in text


@pytest.mark.parametrize("bad", ["no_reference", "records_not_a_folder"])
def test_monitor_names_a_bad_input(bad, tmp_path):
    reference, records = tmp_path / "reference.json", tmp_path / "records"
    if bad == "records_not_a_folder":
        reference.write_text(json.dumps({"records": [], "outputs": []}))
        records.write_text("{}")
    done = subprocess.run(
        [sys.executable, "-m", "ctpipe.monitor", reference, records],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "must be a reference file" in done.stderr
    assert "Traceback" not in done.stderr
