"""The alert rules and the dashboard against real Prometheus: promtool checks and unit-tests the
rules; a Prometheus server scrapes a running node, stays quiet while the node predicts studies of
the training distribution, fires the drift alert once it predicts studies of a new scanner, and
answers every query of the Grafana dashboard. The node writes JSON-lines logs meanwhile, which
are checked last (one object per line, the job's id, no PHI)."""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pydicom
import pytest
import yaml
from promkit import RULES, Prometheus, quick_rules, tool
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from servekit import Receiver, free_port, make_cfg, make_tokens, start_serve, wait_for

from ctpipe import dicomio
from ctpipe.monitor.record import input_features

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ctpipe-dashboard.json"
WINDOW = 5  # monitor.window: the drift test compares at least 5 records (drift.compare's min_n)
# The new scanner of docs/monitoring.md: thinner slices, more noise, +40 HU, another kernel.
NEW_SCANNER = {"slice_spacing_mm": (2.5,), "noise_hu": 35, "hu_offset": 40.0, "kernel": "B70f"}
EXPECTED_FLAGS = {"kernel", "slices", "spacing_z_mm"}  # what 5 studies of it change for sure
# Grafana's variables, as the dashboard's "All" and a short interval resolve them
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".+"}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("promtool"), *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )


def test_promtool_checks_the_rules_and_the_example_config(tmp_path):
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout
    # check config wants the token file the example names; a copy beside a dummy token
    for name in ("prometheus.yml", RULES.name):
        (tmp_path / name).write_text((RULES.parent / name).read_text())
    (tmp_path / "ctpipe-metrics.token").write_text("not-a-real-token\n")
    done = subprocess.run(
        [tool("promtool"), "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_every_alert_pass():
    done = promtool("test", "rules", "ctpipe-alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    tested = yaml.safe_load((RULES.parent / "ctpipe-alerts.test.yml").read_text())
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    cases = [c for t in tested["tests"] for c in t["alert_rule_test"]]
    for alert in alerts:  # each alert seen firing, and seen silent (the other nodes of a
        # firing case are silent too: promtool wants exactly the alerts listed)
        assert any(c["alertname"] == alert and c["exp_alerts"] for c in cases), alert
        assert any(c["alertname"] == alert and not c["exp_alerts"] for c in cases), alert


def test_every_rule_has_severity_summary_description_and_the_docs_name_it():
    docs = (ROOT / "docs" / "monitoring.md").read_text()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert f"`{rule['alert']}`" in docs, (
                f"docs/monitoring.md does not explain {rule['alert']}"
            )


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) of every target of every panel, Grafana's variables resolved."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unresolved variable in {expr}"
            out.append((panel["title"], expr))
    return out


def test_dashboard_uses_the_provisioned_data_source():
    board = json.loads(DASHBOARD.read_text())
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "ctpipe.yml").read_text())[
        "datasources"
    ]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "ctpipe.yml").read_text())[
        "providers"
    ]
    assert source["type"] == "prometheus" and provider["type"] == "file"
    for panel in board["panels"]:
        for ref in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
            assert ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
    wanted = ("histogram_quantile(0.5", "histogram_quantile(0.95", "ctpipe_queue_depth")
    text = json.dumps([q for _, q in dashboard_queries()])
    assert all(w in text for w in wanted)


# -- a node and a Prometheus server ---------------------------------------------------------------
def write_reference(out: Path, studies: Path) -> Path:
    """A drift reference as the monitor_reference stage writes it, from 20 tiny studies."""
    records = []
    for folder in sorted({p.parent for p in studies.rglob("*.dcm")}):
        paths = sorted(folder.glob("*.dcm"))
        hu, geom = dicomio.read_series(paths)
        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        records.append(input_features(first, hu, geom.spacing))
    out.write_text(json.dumps({"records": records, "outputs": []}))
    return out


def c_store(port: int, folder: Path) -> None:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTPIPE")
    assert assoc.is_established
    try:
        for path in sorted(folder.rglob("*.dcm")):
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_package, write_tiny_cohort):
    tool("prometheus")
    tmp = tmp_path_factory.mktemp("alerts")
    write_tiny_cohort(tmp / "reference", n=20, seed=1000)
    reference = write_reference(tmp / "reference.json", tmp / "reference")
    receiver = Receiver()
    raw = make_cfg(
        tmp,
        tiny_package,
        receiver,
        monitor={"reference": str(reference), "window": WINDOW},
        limits={"min_free_disk_mb": 1},
        log_format="json",
        quiet_seconds=3,  # one series, one job, even when a loaded machine stalls the sender
    )
    raw["http"]["port"] = free_port()
    token = make_tokens(tmp)["test"]
    (tmp / "serve.yaml").write_text(yaml.safe_dump(raw))
    node = start_serve(tmp)
    prometheus = None
    try:
        base = f"http://127.0.0.1:{raw['http']['port']}"
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, 60, "the node")
        prometheus = Prometheus(
            tmp / "prometheus",
            [f"127.0.0.1:{raw['http']['port']}"],
            token,
            quick_rules(tmp / "r.yml"),
        )
        yield SimpleNamespace(
            tmp=tmp,
            prometheus=prometheus,
            dicom_port=raw["dicom"]["port"],
            jobs=lambda: httpx.get(f"{base}/jobs", headers={"Authorization": f"Bearer {token}"}),
            log=tmp / "serve.log",
            write=write_tiny_cohort,
        )
    finally:
        if prometheus is not None:
            prometheus.stop()
        node.terminate()
        node.wait(30)
        receiver.server.shutdown()


def run_studies(stack, name: str, n: int, seed: int, **shift) -> float:
    """Send ``n`` studies; wait until the node has predicted and sent all of them and Prometheus
    has scraped the drift gauges after the last job; return the seconds that took."""
    start = time.perf_counter()
    folder = stack.tmp / name
    stack.write(folder, n=n, seed=seed, **shift)
    before = {j["id"] for j in stack.jobs().json()}
    files = len(list(folder.rglob("*.dcm")))
    c_store(stack.dicom_port, folder)

    def finished() -> list[dict]:
        jobs = [j for j in stack.jobs().json() if j["id"] not in before]
        done = all(j["send"] in ("sent", "none", "failed") for j in jobs)
        return jobs if done and sum(j["instances"] for j in jobs) == files else []

    jobs = wait_for(finished, 300, f"the jobs of {n} {name} studies")
    outcomes = [(j["status"], j["send"], j["instances"], j["reason"]) for j in jobs]
    assert len(jobs) == n and all(j["send"] == "sent" for j in jobs), outcomes
    scraped = time.time()
    # the samples Prometheus holds now were scraped after the last job's drift check
    wait_for(
        lambda: stack.prometheus.query(f"timestamp(ctpipe_drift) > {scraped}"),
        30,
        "a scrape of the drift gauges",
    )
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def after_normal(stack):
    seconds = run_studies(stack, "normal", WINDOW, seed=2000)
    time.sleep(3)  # three rule evaluations with the gauges of the full window
    prom = stack.prometheus
    return SimpleNamespace(
        seconds=seconds,
        drift=prom.query("ctpipe_drift"),
        alerts=prom.alerts("CtpipeDriftFlagged"),
        rules=prom.api("rules")["groups"],
    )


@pytest.fixture(scope="module")
def after_shifted(stack, after_normal):
    seconds = run_studies(stack, "new_scanner", WINDOW, seed=3000, **NEW_SCANNER)
    start = time.perf_counter()
    firing: list[dict] = []

    def all_fired() -> bool:  # features flagged by a mixed window fire first; wait for the rest
        firing[:] = stack.prometheus.alerts("CtpipeDriftFlagged", "firing")
        return EXPECTED_FLAGS <= {a["labels"]["feature"] for a in firing}

    try:
        wait_for(all_fired, 30, "the drift alert on every expected feature")
    except AssertionError:
        pass  # the test says what fired
    return SimpleNamespace(seconds=seconds, to_fire=time.perf_counter() - start, firing=firing)


def test_studies_of_the_training_distribution_fire_no_drift_alert(after_normal):
    features = {s["metric"]["feature"]: float(s["value"][1]) for s in after_normal.drift}
    assert {"kernel", "slices", "body_hu_p50"} <= set(features)  # the check ran on the window
    assert set(features.values()) == {0.0}, features
    assert after_normal.alerts == []  # neither pending nor firing
    for group in after_normal.rules:  # every rule evaluates without error on the node's series
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule


def test_studies_of_a_new_scanner_fire_the_drift_alert(after_shifted):
    flagged = {a["labels"]["feature"] for a in after_shifted.firing}
    assert EXPECTED_FLAGS <= flagged, flagged
    for alert in after_shifted.firing:
        assert alert["labels"]["severity"] == "warning" and alert["labels"]["job"] == "ctpipe"
        assert "p-value" in alert["annotations"]["description"]
    print(
        f"\n{WINDOW} studies {after_shifted.seconds:.1f} s, drift alert firing on "
        f"{sorted(flagged)} {after_shifted.to_fire:.1f} s after the last job was scraped"
    )


def test_every_dashboard_query_returns_data(stack, after_shifted):
    empty = []
    for title, expr in dashboard_queries():
        samples = stack.prometheus.query(expr)
        values = [float(s["value"][1]) for s in samples]
        if not any(math.isfinite(v) for v in values):
            empty.append(f"{title}: {expr} -> {values}")
    assert not empty, "\n".join(empty)


def test_json_logs_one_object_per_line_with_job_ids_and_no_phi(stack, after_shifted):
    lines = stack.log.read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert len(entries) > 2 * WINDOW
    for entry in entries:
        assert {"time", "level", "logger", "role", "event"} <= set(entry), entry
        assert entry["time"].endswith("Z") and entry["role"] == "all"
    job_ids = {j["id"] for j in stack.jobs().json()}
    logged = {e["job"] for e in entries if "job" in e}
    assert job_ids <= logged  # every job has lines that carry its id
    for entry in entries:
        if "job" in entry:
            assert entry["event"].startswith(f"job {entry['job']}")
    text = stack.log.read_text()
    for folder in ("normal", "new_scanner"):
        for path in (stack.tmp / folder).rglob("*.dcm"):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for value in (
                ds.PatientID,
                str(ds.PatientName),
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
            ):
                assert value not in text
