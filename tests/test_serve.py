"""The DICOM node in one process: C-ECHO and the AE allow-list, C-STORE -> job -> SEG + SR sent
to a destination SCP, STOW-RS (parts, failures, token, limits), refusals with reasons, and the
spool's recovery from every state a kill can leave."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from servekit import InProcessNode, Receiver, make_cfg, receive_all, wait_for

from ctpipe.serve.send import multipart_related
from ctpipe.serve.spool import Spool


@pytest.fixture
def node(tmp_path, tiny_package):
    receiver = Receiver()
    node = InProcessNode(make_cfg(tmp_path, tiny_package, receiver)).start()
    yield node.cfg, node.spool, node.client, receiver, node
    node.close()
    receiver.server.shutdown()


@pytest.fixture
def study(tmp_path, write_tiny_cohort) -> list[Path]:
    write_tiny_cohort(tmp_path / "study", n=1, seed=21)
    return sorted((tmp_path / "study").rglob("*.dcm"))


def associate(cfg, calling: str = "PACS"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", cfg.dicom.port, ae_title="CTPIPE")


def test_echo_only_for_allowed_callers(node):
    cfg = node[0]
    assoc = associate(cfg)
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert not associate(cfg, calling="STRANGER").is_established


def test_an_allowed_ae_title_from_another_host_is_refused(tmp_path, tiny_package):
    raw = make_cfg(tmp_path, tiny_package, None)
    raw["dicom"]["allowed_callers"] = [{"ae_title": "PACS", "host": "10.11.12.13"}]
    node = InProcessNode(raw).start(runner=False)
    try:
        assoc = associate(node.cfg)  # from 127.0.0.1
        assert not assoc.is_established  # rejected: the requestor sees the association end
    finally:
        node.close()


def test_c_store_series_becomes_a_job_and_seg_and_sr_come_back(node, study):
    cfg, spool, client, receiver, n = node
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
    assert len(list((cfg.spool_dir / "records").glob("*.json"))) == 1  # for the monitor
    jobs = client.get("/jobs", headers=n.auth()).json()
    assert [j["status"] for j in jobs] == ["predicted"] and jobs[0]["send"] == "sent"
    text = client.get("/metrics", headers=n.auth()).text
    assert 'ctpipe_instances_received_total{outcome="stored",protocol="dimse"}' in text
    assert "ctpipe_inference_seconds_bucket" in text and 'model_version="fp32-test"' in text


def test_stow_rs_stores_good_parts_and_lists_failed_ones(node, study):
    cfg, spool, client, _, n = node
    blobs = [p.read_bytes() for p in study]
    body, ctype = multipart_related(blobs + [b"not dicom at all"])
    response = client.post(
        "/dicom-web/studies", content=body, headers={**n.auth(), "Content-Type": ctype}
    )
    assert response.status_code == 202
    result = response.json()
    assert len(result["00081199"]["Value"]) == len(study)
    (failed,) = result["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xC000]
    wait_for(lambda: [r for r in spool.records() if r["status"] == "predicted"])


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, "token-alone"])
def test_http_needs_the_bearer_token(node, headers):
    client, n = node[2], node[4]
    if headers == "token-alone":  # the token without "Bearer "
        headers = {"Authorization": n.tokens["test"]}
    assert client.get("/healthz").status_code == 200  # probes are open
    for path in ("/jobs", "/metrics"):
        assert client.get(path, headers=headers).status_code == 401
    body, ctype = multipart_related([b"x"])
    response = client.post(
        "/dicom-web/studies", content=body, headers={**headers, "Content-Type": ctype}
    )
    assert response.status_code == 401


def test_request_and_study_limits(node, study):
    cfg, spool, client, _, n = node
    body, ctype = multipart_related([b"0" * (65 << 20)])
    response = client.post(
        "/dicom-web/studies", content=body, headers={**n.auth(), "Content-Type": ctype}
    )
    assert response.status_code == 413
    spool.max_study = len(study[0].read_bytes()) * 3  # room for three slices of the study
    assoc = associate(cfg)
    statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in study[:5]]
    assoc.release()
    assert statuses[:3] == [0, 0, 0] and statuses[3:] == [0xA700, 0xA700]


def test_a_series_the_model_refuses_finishes_with_the_reason(node, study, tmp_path):
    cfg, spool, client, receiver, n = node
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
            "/dicom-web/studies", content=body, headers={**n.auth(), "Content-Type": ctype}
        ).status_code
        == 200
    )
    record = wait_for(lambda: [r for r in spool.records() if r["status"] in ("refused", "failed")])[
        0
    ]
    assert record["status"] == "refused" and "modality MR" in record["reason"]
    assert record["send"] == "none" and not receiver.received
    answer = client.get(f"/jobs/{record['id']}", headers=n.auth()).json()
    assert answer["reason"] == record["reason"]


def test_readyz_says_what_is_missing(tmp_path):
    node = InProcessNode(make_cfg(tmp_path, tmp_path / "no-package", None))
    response = node.client.get("/readyz")
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
    node = InProcessNode(make_cfg(tmp_path, tiny_package, receiver))
    spool = node.spool
    receive_all(spool, study)
    node.runner.start()
    try:
        wait_for(lambda: [r for r in spool.records() if r["attempts"] >= 2])
        assert spool.records()[0]["send"] == "retrying"
        back = Receiver(port)  # the destination comes back
        wait_for(lambda: [r for r in spool.records() if r["send"] == "sent"], 30)
        assert sorted(d.Modality for d in back.received) == ["SEG", "SR"]
        back.server.shutdown()
    finally:
        node.close()


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
        ({"model": "fp16"}, "model: Input should be 'fp32' or 'int8'"),
        ({"destination": {"kind": "ftp"}}, "destination.kind: Input should be"),
        ({"dicom": {"ae_title": "CTPIPE", "port": 1, "allowed_callers": []}}, "allowed_callers"),
        ({"workers": None}, "workers: Field required"),
        ({"workers": "two"}, "workers: Input should be a valid integer"),
        ({"workers": 0}, "workers: Input should be greater than or equal to 1"),
        (
            {
                "dicom": {
                    "ae_title": "CTPIPE",
                    "port": 70000,
                    "allowed_callers": [{"ae_title": "A"}],
                }
            },
            "dicom.port: Input should be less than or equal to 65535",
        ),  # fmt: skip
        ({"quiet_second": 5}, "quiet_second: Extra inputs are not permitted"),  # a typo
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts"),
        ({"host": "0.0.0.0"}, "without tls on 0.0.0.0, beyond localhost"),
        (
            {"destination": {"kind": "dicomweb", "url": "http://pacs.example/dicom-web"}},
            "destination.url is http://",
        ),
        ({"destination": {"kind": "dicomweb", "url": "ftp://x"}}, "an http(s) URL is needed"),
        (
            {
                "dicom": {
                    "ae_title": "CTPIPE",
                    "port": 1,
                    "allowed_callers": [{"ae_title": "A", "host": "not-an-ip"}],
                }
            },
            "dicom.allowed_callers.0.host",
        ),  # fmt: skip
        ({"http": {"port": 8080, "tokens_file": "missing.yaml"}}, "missing.yaml: cannot read"),
        ({"spool_dir": "spool-0755"}, "lets other users read patient data"),
    ],
)
def test_a_bad_config_stops_the_server_with_the_key(change, message, tmp_path, caplog):
    import yaml

    from ctpipe.serve import tokens
    from ctpipe.serve.__main__ import main

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve.yaml").read_text())
    tokens.add(tmp_path / "tokens.yaml", "t", ["read"])
    cfg.update(spool_dir=str(tmp_path / "spool"))
    cfg["http"]["tokens_file"] = str(tmp_path / "tokens.yaml")
    cfg.update(change)
    if change.get("spool_dir") == "spool-0755":
        (tmp_path / "spool-0755").mkdir(mode=0o755)
        os.chmod(tmp_path / "spool-0755", 0o755)
        cfg["spool_dir"] = str(tmp_path / "spool-0755")
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "serve.yaml")]) == 2
    assert message in caplog.text
