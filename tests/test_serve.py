"""The DICOM node in one process: C-ECHO and the AE allow-list, C-STORE -> job -> SEG + SR sent
to a destination SCP, STOW-RS (parts, failures, token, limits), refusals with reasons, and the
spool's recovery from every state a kill can leave."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from ctpipe.serve.dimse import StoreSCP
from ctpipe.serve.runner import Runner
from ctpipe.serve.send import multipart_related
from ctpipe.serve.spool import Spool
from ctpipe.serve.telemetry import Metrics
from ctpipe.serve.web import create_app

TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Receiver:
    """A destination SCP that keeps what it is sent (the PACS in these tests)."""

    def __init__(self, port: int | None = None) -> None:
        self.port, self.received = port or free_port(), []
        ae = AE(ae_title="DEST")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.store)]
        )

    def store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000


def make_cfg(tmp_path: Path, package: Path, receiver: Receiver | None) -> dict:
    return {
        "host": "127.0.0.1",
        "package": str(package),
        "model": "fp32",
        "spool_dir": str(tmp_path / "spool"),
        "workers": 1,
        "quiet_seconds": 0.5,
        "max_request_mb": 64,
        "max_study_mb": 64,
        "dicom": {
            "ae_title": "CTPIPE",
            "port": free_port(),
            "allowed_callers": [{"ae_title": "PACS", "host": "127.0.0.1"}, {"ae_title": "ANY"}],
        },
        "http": {"port": 0},
        "destination": {
            "kind": "dicom",
            "ae_title": "DEST",
            "host": "127.0.0.1",
            "port": receiver.port,
        }
        if receiver
        else {"kind": "none"},
        "retry": {"first_seconds": 0.2, "max_seconds": 1},
    }


@pytest.fixture
def node(tmp_path, tiny_package):
    receiver = Receiver()
    cfg = make_cfg(tmp_path, tiny_package, receiver)
    metrics = Metrics("fp32-test")
    spool = Spool(Path(cfg["spool_dir"]), cfg["quiet_seconds"], 64 << 20)
    runner, scp = Runner(spool, cfg, metrics), StoreSCP(cfg, spool, metrics)
    runner.start()
    scp.start()
    client = TestClient(create_app(cfg, spool, metrics, TOKEN))
    yield cfg, spool, client, receiver
    scp.shutdown()
    runner.shutdown()
    receiver.server.shutdown()


@pytest.fixture
def study(tmp_path, write_tiny_cohort) -> list[Path]:
    write_tiny_cohort(tmp_path / "study", n=1, seed=21)
    return sorted((tmp_path / "study").rglob("*.dcm"))


def associate(cfg: dict, calling: str = "PACS"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", cfg["dicom"]["port"], ae_title="CTPIPE")


def wait_for(predicate, seconds: float = 180.0):
    end = time.time() + seconds
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_echo_only_for_allowed_callers(node):
    cfg = node[0]
    assoc = associate(cfg)
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert not associate(cfg, calling="STRANGER").is_established


def test_an_allowed_ae_title_from_another_host_is_refused(tmp_path, tiny_package):
    cfg = make_cfg(tmp_path, tiny_package, None)
    cfg["dicom"]["allowed_callers"] = [{"ae_title": "PACS", "host": "10.11.12.13"}]
    spool = Spool(Path(cfg["spool_dir"]), 1, 1 << 20)
    scp = StoreSCP(cfg, spool, Metrics("x"))
    scp.start()
    try:
        assoc = associate(cfg)  # from 127.0.0.1
        assert not assoc.is_established  # rejected: the requestor sees the association end
    finally:
        scp.shutdown()


def test_c_store_series_becomes_a_job_and_seg_and_sr_come_back(node, study):
    cfg, spool, client, receiver = node
    assoc = associate(cfg)
    assert assoc.is_established
    for path in study:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assoc.release()
    record = wait_for(lambda: [r for r in spool.records() if r["send"] == "sent"])[0]
    assert record["status"] == "predicted" and record["instances"] == len(study)
    source = pydicom.dcmread(study[0], stop_before_pixels=True)
    kinds = sorted(ds.Modality for ds in receiver.received)
    assert kinds == ["SEG", "SR"]
    for ds in receiver.received:
        assert ds.StudyInstanceUID == source.StudyInstanceUID  # results land in the same study
    seg = next(ds for ds in receiver.received if ds.Modality == "SEG")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert len(list((Path(cfg["spool_dir"]) / "records").glob("*.json"))) == 1  # for the monitor
    jobs = client.get("/jobs", headers=auth()).json()
    assert [j["status"] for j in jobs] == ["predicted"] and jobs[0]["send"] == "sent"
    text = client.get("/metrics", headers=auth()).text
    assert 'ctpipe_instances_received_total{outcome="stored",protocol="dimse"}' in text
    assert "ctpipe_inference_seconds_bucket" in text and 'model_version="fp32-test"' in text


def test_stow_rs_stores_good_parts_and_lists_failed_ones(node, study):
    cfg, spool, client, _ = node
    blobs = [p.read_bytes() for p in study]
    body, ctype = multipart_related(blobs + [b"not dicom at all"])
    response = client.post(
        "/dicom-web/studies", content=body, headers={**auth(), "Content-Type": ctype}
    )
    assert response.status_code == 202
    result = response.json()
    assert len(result["00081199"]["Value"]) == len(study)
    (failed,) = result["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    wait_for(lambda: [r for r in spool.records() if r["status"] == "predicted"])


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
def test_http_needs_the_bearer_token(node, headers):
    client = node[2]
    assert client.get("/healthz").status_code == 200  # probes are open
    for path in ("/jobs", "/metrics"):
        assert client.get(path, headers=headers).status_code == 401
    body, ctype = multipart_related([b"x"])
    response = client.post(
        "/dicom-web/studies", content=body, headers={**headers, "Content-Type": ctype}
    )
    assert response.status_code == 401


def test_request_and_study_limits(node, study):
    cfg, spool, client, _ = node
    body, ctype = multipart_related([b"0" * (65 << 20)])
    response = client.post(
        "/dicom-web/studies", content=body, headers={**auth(), "Content-Type": ctype}
    )
    assert response.status_code == 413
    spool.max_study = len(study[0].read_bytes()) * 3  # room for three slices of the study
    assoc = associate(cfg)
    statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in study[:5]]
    assoc.release()
    assert statuses[:3] == [0, 0, 0] and statuses[3:] == [0xA700, 0xA700]


def test_a_series_the_model_refuses_finishes_with_the_reason(node, study, tmp_path):
    cfg, spool, client, receiver = node
    blobs = []
    for path in study:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        out = tmp_path / "mr.dcm"
        ds.save_as(out)
        blobs.append(out.read_bytes())
    body, ctype = multipart_related(blobs)
    assert (
        client.post(
            "/dicom-web/studies", content=body, headers={**auth(), "Content-Type": ctype}
        ).status_code
        == 200
    )
    record = wait_for(lambda: [r for r in spool.records() if r["status"] in ("refused", "failed")])[
        0
    ]
    assert record["status"] == "refused" and "modality MR" in record["reason"]
    assert record["send"] == "none" and not receiver.received
    assert client.get(f"/jobs/{record['id']}", headers=auth()).json()["reason"] == record["reason"]


def test_readyz_says_what_is_missing(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path / "no-package", None)
    spool = Spool(Path(cfg["spool_dir"]), 1, 1 << 20)
    client = TestClient(create_app(cfg, spool, Metrics("x"), TOKEN))
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["model"] is False


def test_spool_recovers_every_state_a_kill_leaves(tmp_path, study):
    spool = Spool(tmp_path / "spool", quiet_seconds=0, max_study_bytes=1 << 30)
    ds = pydicom.dcmread(study[0], stop_before_pixels=True)
    ids = (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    for path in study[:3]:
        spool.receive(path.read_bytes(), *ids, pydicom.dcmread(path).SOPInstanceUID)
    (spool.tmp / "half.dcm").write_bytes(b"half an instance")  # killed while writing
    (spool.jobs / "00-empty").mkdir()  # killed between mkdir and the move
    moved = spool.jobs / "01-unrecorded"  # killed between the move and the record
    moved.mkdir()
    (moved / "input").mkdir()
    (moved / "input" / "x.dcm").write_bytes(study[3].read_bytes())
    job = spool.make_job(spool.complete_series(now=time.time() + 1)[0])
    spool.claim()  # -> running, then killed during inference with partial outputs
    (spool.jobs / job / "out" / "partial").mkdir(parents=True)
    counts = spool.recover()
    assert counts == {"requeued": 1, "recorded": 1, "removed": 1, "tmp_removed": 1}
    records = {r["id"]: r for r in spool.records()}
    assert set(records) == {"01-unrecorded", job}
    assert {r["status"] for r in records.values()} == {"queued"}
    assert records[job]["instances"] == 3 and not (spool.jobs / job / "out").exists()
    assert not list(spool.tmp.iterdir()) and not (spool.jobs / "00-empty").exists()


def test_failed_sends_are_retried_until_they_succeed(tmp_path, tiny_package, study):
    receiver = Receiver()
    port = receiver.port
    receiver.server.shutdown()  # the destination is down at first
    cfg = make_cfg(tmp_path, tiny_package, receiver)
    metrics = Metrics("fp32-test")
    spool = Spool(Path(cfg["spool_dir"]), cfg["quiet_seconds"], 64 << 20)
    ds = pydicom.dcmread(study[0], stop_before_pixels=True)
    for path in study:
        spool.receive(
            path.read_bytes(),
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            pydicom.dcmread(path).SOPInstanceUID,
        )
    runner = Runner(spool, cfg, metrics)
    runner.start()
    try:
        wait_for(lambda: [r for r in spool.records() if r["attempts"] >= 2])
        assert spool.records()[0]["send"] == "retrying"
        back = Receiver(port)  # the destination comes back
        wait_for(lambda: [r for r in spool.records() if r["send"] == "sent"], 30)
        assert sorted(d.Modality for d in back.received) == ["SEG", "SR"]
        back.server.shutdown()
    finally:
        runner.shutdown()


def test_study_size_counts_what_is_still_incoming(tmp_path, study):
    spool = Spool(tmp_path / "spool", quiet_seconds=0, max_study_bytes=1 << 30)
    ds = pydicom.dcmread(study[0], stop_before_pixels=True)
    ids = (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    sizes = [p.stat().st_size for p in study[:3]]
    for path in study[:3]:
        spool.receive(path.read_bytes(), *ids, pydicom.dcmread(path).SOPInstanceUID)
    spool.receive(study[0].read_bytes(), *ids, pydicom.dcmread(study[0]).SOPInstanceUID)  # again
    assert spool.study_bytes(ids[0]) == sum(sizes)
    assert Spool(tmp_path / "spool", 0, 1 << 30).study_bytes(ids[0]) == sum(sizes)  # a restart
    spool.make_job(spool.complete_series(now=time.time() + 1)[0])
    assert spool.study_bytes(ids[0]) == 0


def test_stray_files_in_the_spool_do_not_stop_a_restart(tmp_path):
    spool = Spool(tmp_path / "spool", quiet_seconds=0, max_study_bytes=1 << 20)
    (spool.jobs / ".probe").write_bytes(b"")  # a readiness probe killed before its unlink
    (spool.incoming / "stray.txt").write_text("not a study folder")
    assert spool.recover()["removed"] == 0 and spool.complete_series() == []
    assert (spool.jobs / ".probe").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "fp16"}, "model 'fp16' is not fp32 or int8"),
        ({"destination": {"kind": "ftp"}}, "destination.kind 'ftp'"),
        (
            {"dicom": {"ae_title": "CTPIPE", "port": 1, "allowed_callers": []}},
            "allowed_callers is empty",
        ),
        ({"workers": None}, "missing key 'workers'"),
        ({}, "no HTTP token of 16 characters"),
    ],
)
def test_a_bad_config_stops_the_server_with_the_key(change, message, tmp_path, monkeypatch, caplog):
    import yaml

    from ctpipe.serve.__main__ import main

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve.yaml").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("CTPIPE_SERVE_TOKEN", "short" if not change else TOKEN)
    assert main(["--config", str(tmp_path / "serve.yaml")]) == 2
    assert message in caplog.text
