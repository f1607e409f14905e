"""The node on a hospital network: values from data never become paths, scoped tokens, limits,
a disk watermark, TLS with client certificates, a retention policy, an audit trail without PHI,
and a delivery loop that no destination, corrupt record or slow predict can wedge."""

from __future__ import annotations

import io
import json
import stat
import time
from pathlib import Path

import pydicom
import pytest
from pydicom import config as pydicom_config
from pynetdicom import AE, build_context
from pynetdicom.sop_class import (
    CTImageStorage,
    SegmentationStorage,
    Verification,
)
from servekit import (
    InProcessNode,
    Receiver,
    free_port,
    make_certs,
    make_cfg,
    make_tokens,
    receive_all,
    start_serve,
    wait_for,
)

from ctpipe.serve.send import multipart_related
from ctpipe.serve.telemetry import tag

HOSTILE = ["..", ".", "/", "/etc/passwd", "1.2\x00.3", "1" * 65]
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def study(tmp_path, write_tiny_cohort) -> list[Path]:
    write_tiny_cohort(tmp_path / "study", n=1, seed=23)
    return sorted((tmp_path / "study").rglob("*.dcm"))


@pytest.fixture
def node(tmp_path, tiny_package):
    node = InProcessNode(make_cfg(tmp_path, tiny_package, None)).start(runner=False)
    yield node
    node.close()


def associate(port: int, calling: str = "PACS", tls=None):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="CTPIPE", tls_args=tls)


def hostile_copy(path: Path, field: str, value: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds[field].value = value
    return ds


def everything_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("field", ["SeriesInstanceUID", "SOPInstanceUID", "StudyInstanceUID"])
def test_c_store_refuses_uids_that_are_not_uids_and_writes_nothing_outside(
    node, study, tmp_path, field, monkeypatch
):
    monkeypatch.setattr(pydicom_config.settings, "writing_validation_mode", pydicom_config.WARN)
    before = everything_under(tmp_path) - everything_under(node.cfg.spool_dir)
    # pynetdicom's SCU itself will not send a SOP Instance UID over 64 characters
    values = HOSTILE[:-1] if field == "SOPInstanceUID" else HOSTILE
    assoc = associate(node.scp.port)
    statuses = [assoc.send_c_store(hostile_copy(study[0], field, v)).Status for v in values]
    good = assoc.send_c_store(pydicom.dcmread(study[1])).Status
    assoc.release()
    assert statuses == [0xC000] * len(values) and good == 0x0000
    after = everything_under(tmp_path) - everything_under(node.cfg.spool_dir)
    assert after == before  # nothing written or deleted beside the spool
    assert len(list(node.spool.incoming.rglob("*.dcm"))) == 1  # only the good instance


def test_stow_rs_lists_uids_that_are_not_uids_as_failed(node, study, tmp_path, monkeypatch):
    monkeypatch.setattr(pydicom_config.settings, "writing_validation_mode", pydicom_config.WARN)
    blobs = []
    for value in HOSTILE:
        buffer = io.BytesIO()
        hostile_copy(study[0], "SeriesInstanceUID", value).save_as(buffer)
        blobs.append(buffer.getvalue())
    body, ctype = multipart_related(blobs + [study[1].read_bytes()])
    response = node.client.post(
        "/dicom-web/studies", content=body, headers={**node.auth(), "Content-Type": ctype}
    )
    assert response.status_code == 202
    failed = response.json()["00081198"]["Value"]
    assert [f["00081197"]["Value"] for f in failed] == [[0xC000]] * len(HOSTILE)
    assert all("00081155" not in f for f in failed)  # a value that is not a UID is not echoed
    assert len(response.json()["00081199"]["Value"]) == 1
    assert len(list(node.spool.incoming.rglob("*.dcm"))) == 1
    assert not list(node.spool.tmp.iterdir())  # no part left half-stored


def test_stow_rs_is_parsed_as_a_stream_whatever_the_chunks(node, study):
    body, ctype = multipart_related([p.read_bytes() for p in study[:4]])

    def chunks(size=7):  # boundaries split across chunks
        for i in range(0, len(body), size):
            yield body[i : i + size]

    response = node.client.post(
        "/dicom-web/studies", content=chunks(), headers={**node.auth(), "Content-Type": ctype}
    )
    assert response.status_code == 200 and len(response.json()["00081199"]["Value"]) == 4
    stored = sorted(p.read_bytes() for p in node.spool.incoming.rglob("*.dcm"))
    assert stored == sorted(p.read_bytes() for p in study[:4])  # byte for byte


def test_scopes_and_the_rate_limit(tmp_path, tiny_package):
    raw = make_cfg(tmp_path, tiny_package, None, limits={"calls_per_minute": 3})
    node = InProcessNode(raw, {"reader": ["read"], "scraper": ["metrics"]})
    try:
        reader, scraper = node.auth("reader"), node.auth("scraper")
        assert node.client.get("/metrics", headers=reader).status_code == 403
        assert node.client.get("/jobs", headers=scraper).status_code == 403
        body, ctype = multipart_related([b"x"])
        post = node.client.post(
            "/dicom-web/studies", content=body, headers={**reader, "Content-Type": ctype}
        )
        assert post.status_code == 403
        codes = [node.client.get("/jobs", headers=reader).status_code for _ in range(4)]
        assert codes[:2] == [200, 200] and codes[-1] == 429  # 3 calls a minute, one used above
        assert node.client.get("/metrics", headers=scraper).status_code == 200  # its own bucket
        lines = [json.loads(line) for line in node.audit_lines()]
        assert {(e["token"], e["status"]) for e in lines if e["event"] == "request"} >= {
            ("reader", 403),
            ("reader", 429),
            ("scraper", 200),
        }
    finally:
        node.close()


def test_dicom_limits_on_associations_and_calls(tmp_path, tiny_package):
    raw = make_cfg(tmp_path, tiny_package, None, limits={"max_associations": 1})
    node = InProcessNode(raw).start(runner=False)
    try:
        first = associate(node.scp.port)
        assert first.is_established
        assert not associate(node.scp.port, calling="ANY").is_established  # one at a time
        first.release()
        assert associate(node.scp.port, calling="STRANGER").is_established is False
        refused = [
            json.loads(line)
            for line in node.audit_lines()
            if '"refused"' in line and '"association"' in line
        ]
        reasons = {(e["calling_ae"], e["reason"]) for e in refused}
        assert ("ANY", "limits.max_associations reached") in reasons
        assert ("STRANGER", "calling AE title not allowed") in reasons
    finally:
        node.close()
    raw = make_cfg(tmp_path / "b", tiny_package, None, limits={"calls_per_minute": 2})
    node = InProcessNode(raw).start(runner=False)
    try:
        results = []
        for _ in range(3):
            assoc = associate(node.scp.port)
            results.append(assoc.is_established)
            if assoc.is_established:
                assoc.release()
        assert results == [True, True, False]
    finally:
        node.close()


def test_below_the_disk_watermark_new_instances_are_refused(tmp_path, tiny_package, study):
    raw = make_cfg(tmp_path, tiny_package, None, limits={"min_free_disk_mb": 1e9})  # a petabyte
    node = InProcessNode(raw).start(runner=False)
    try:
        assoc = associate(node.scp.port)
        assert assoc.send_c_store(pydicom.dcmread(study[0])).Status == 0xA700
        assoc.release()
        body, ctype = multipart_related([study[0].read_bytes()])
        response = node.client.post(
            "/dicom-web/studies", content=body, headers={**node.auth(), "Content-Type": ctype}
        )
        assert response.status_code == 507
        ready = node.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["disk"] is False
        assert "min_free_disk_mb" in ready.json()["reason"]
        assert not list(node.spool.incoming.rglob("*.dcm"))
    finally:
        node.close()


def fake_job(node: InProcessNode, study: list[Path], sop_classes: list[str], **record) -> str:
    """A predicted job in the spool whose results are copies of ``study[0]`` with the given SOP
    classes (the delivery loop is tested without running predict)."""
    node.spool.receive(study[0].read_bytes(), "1.2.3", f"1.2.3.{len(record)}", "1.2.3.4.5")
    job = node.spool.make_job(node.spool.complete_series(now=time.time() + 60)[0])
    out = node.spool.jobs / job / "out" / "1.2.3.4"
    out.mkdir(parents=True)
    for name, cls in zip(("seg.dcm", "sr.dcm"), sop_classes):
        ds = pydicom.dcmread(study[0])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = cls
        ds.save_as(out / name)
    saved = node.spool.load(job)
    saved.update({"status": "predicted", "send": "pending", **record})
    node.spool.save(saved)
    return job


def test_a_destination_that_refuses_the_sr_fails_the_job_for_good_and_blocks_nothing(
    tmp_path, tiny_package, study
):
    receiver = Receiver(contexts=[build_context(SegmentationStorage)])  # no SR storage
    raw = make_cfg(tmp_path, tiny_package, receiver)
    raw["retry"] = {"first_seconds": 0.05, "max_seconds": 0.1, "max_attempts": 3}
    node = InProcessNode(raw)
    sr = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    refused = fake_job(node, study, [SegmentationStorage, sr])
    broken = fake_job(node, study, [SegmentationStorage, sr], x=1)
    (node.spool.jobs / broken / "out" / "1.2.3.4" / "sr.dcm").write_bytes(b"not DICOM")
    node.runner.start()
    try:
        done = wait_for(
            lambda: all(r["send"] == "failed" for r in node.spool.records()), 60, "failed sends"
        )
        assert done
        records = {r["id"]: r for r in node.spool.records()}
        assert records[refused]["attempts"] == 3
        assert "accepts no Comprehensive 3D SR Storage" in records[refused]["send_error"]
        assert records[broken]["attempts"] == 3  # an exception other than SendError: attempts too
        text = node.client.get("/metrics", headers=node.auth()).text
        assert "ctpipe_jobs_send_failed 2.0" in text
        assert 'ctpipe_result_sends_total{outcome="failed"} 2.0' in text
        sends = [json.loads(x) for x in node.audit_lines() if '"event": "send"' in x]
        assert [s["attempt"] for s in sends if s["job"] == refused] == [1, 2, 3]
    finally:
        node.close()
        receiver.server.shutdown()
    # and a job behind them still goes out
    good_receiver = Receiver()
    raw = make_cfg(tmp_path / "second", tiny_package, good_receiver)
    node = InProcessNode(raw)
    fake_job(node, study, [SegmentationStorage, sr], y=1, z=2)
    node.runner.start()
    try:
        wait_for(lambda: [r for r in node.spool.records() if r["send"] == "sent"], 30, "a send")
    finally:
        node.close()
        good_receiver.server.shutdown()


def test_backoff_doubles_with_jitter_and_is_capped(node):
    node.runner.cfg = node.cfg.model_copy(
        update={"retry": node.cfg.retry.model_copy(update={"first_seconds": 1, "max_seconds": 8})}
    )
    waits = [[node.runner.backoff(n) for _ in range(200)] for n in (1, 2, 3, 4, 5, 9)]
    jitter = node.cfg.retry.jitter
    for n, (cap, values) in enumerate(zip([1, 2, 4, 8, 8, 8], waits)):
        assert cap * (1 - jitter) <= min(values) and max(values) <= cap, n
        assert max(values) - min(values) > cap * jitter / 2  # spread, not one value


def test_a_corrupt_job_record_is_quarantined_and_the_node_goes_on(node, study):
    first = fake_job(node, study, [SegmentationStorage, SegmentationStorage])
    second = fake_job(node, study, [SegmentationStorage, SegmentationStorage], x=1)
    path = node.spool.jobs / first / "job.json"
    path.write_bytes(path.read_bytes()[:40])  # truncated by a crash
    assert [r["id"] for r in node.spool.records()] == [second]
    assert (node.spool.quarantine / first / "REASON.txt").read_text().startswith("job.json")
    assert [r["id"] for r in node.client.get("/jobs", headers=node.auth()).json()] == [second]
    assert "ctpipe_jobs_quarantined 1.0" in node.client.get("/metrics", headers=node.auth()).text


def test_predict_past_its_time_limit_fails_the_job_and_the_node_goes_on(
    tmp_path, tiny_package, study
):
    raw = make_cfg(tmp_path, tiny_package, None, predict_timeout_seconds=0.3)
    node = InProcessNode(raw)
    receive_all(node.spool, study)
    node.runner.start()
    try:
        (record,) = wait_for(
            lambda: [r for r in node.spool.records() if r["status"] == "failed"], 60, "a failure"
        )
        assert "ran past predict_timeout_seconds (0.3 s)" in record["reason"]
        assert record["send"] == "none" and record["done"] is not None
        assert all(p.proc is None for p in node.runner.processes)  # killed, made anew next time
    finally:
        node.close()


def test_retention_deletes_inputs_after_the_hold_and_jobs_after_their_days(node, study):
    old = fake_job(node, study, [SegmentationStorage], send="sent", done=time.time() - 10 * 86400)
    held = fake_job(node, study, [SegmentationStorage], send="sent", done=time.time() - 2 * 86400)
    fresh = fake_job(node, study, [SegmentationStorage], send="sent", done=time.time() - 60)
    pending = fake_job(node, study, [SegmentationStorage], x=1)
    node.runner.expire(time.time())
    assert not (node.spool.jobs / old).exists()
    assert not (node.spool.jobs / held / "input").exists()
    assert (node.spool.jobs / held / "out").exists()  # results stay for jobs_days
    for job in (fresh, pending):
        assert (node.spool.jobs / job / "input").is_dir()
    listed = {j["id"]: j for j in node.client.get("/jobs", headers=node.auth()).json()}
    assert set(listed) == {held, fresh, pending}
    assert listed[held]["input_deleted"] and listed[held]["input_expires"] is None
    assert listed[fresh]["input_expires"] == pytest.approx(time.time() + 86400 - 60, abs=30)
    assert listed[pending]["expires"] is None  # not done: the clock has not started
    retention = [json.loads(x) for x in node.audit_lines() if '"retention"' in x]
    assert {(e["job"], e["what"]) for e in retention} == {(old, "job"), (held, "input")}


def test_the_spool_is_owner_only(node, study):
    node.spool.receive(study[0].read_bytes(), "1.2.3", "1.2.3.4", "1.2.3.4.5")
    for path in [node.cfg.spool_dir, *node.cfg.spool_dir.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, (path, oct(mode))
    assert stat.S_IMODE(node.cfg.audit_path.stat().st_mode) == 0o600


def test_dicom_tls_with_client_certificates(tmp_path, tiny_package, study):
    import ssl

    certs = make_certs(tmp_path / "certs")
    tls = {
        "cert": str(certs["server"]),
        "key": str(certs["server_key"]),
        "ca": str(certs["ca"]),
        "require_client_cert": True,
    }
    raw = make_cfg(tmp_path, tiny_package, None)
    raw["dicom"]["tls"] = tls
    node = InProcessNode(raw).start(runner=False)

    def client(cert: str | None):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs["ca"])
        if cert:
            ctx.load_cert_chain(certs[cert], certs[f"{cert}_key"])
        return (ctx, "127.0.0.1")

    try:
        good = associate(node.scp.port, tls=client("client"))
        assert good.is_established
        assert good.send_c_store(pydicom.dcmread(study[0])).Status == 0x0000
        good.release()
        assert not associate(node.scp.port, tls=client("rogue")).is_established  # other CA
        assert not associate(node.scp.port, tls=client(None)).is_established  # no certificate
        assert not associate(node.scp.port).is_established  # not TLS at all
        events = [json.loads(x) for x in node.audit_lines() if '"association"' in x]
        refused = [e for e in events if e["outcome"] == "refused"]
        assert len(refused) == 3 and all("TLS handshake failed" in e["reason"] for e in refused)
        assert {e["protocol"] for e in events} == {"dimse-tls"}
    finally:
        node.close()


def test_the_audit_log_names_who_did_what_without_phi(tmp_path, tiny_package, study):
    receiver = Receiver()
    node = InProcessNode(make_cfg(tmp_path, tiny_package, receiver)).start()
    try:
        assoc = associate(node.scp.port)
        for path in study:
            assoc.send_c_store(pydicom.dcmread(path))
        assoc.release()
        wait_for(lambda: [r for r in node.spool.records() if r["send"] == "sent"], 180, "send")
        node.client.get("/jobs", headers=node.auth())
    finally:
        node.close()
        receiver.server.shutdown()
    events = [json.loads(x) for x in node.audit_lines()]
    kinds = {(e["event"], e["outcome"]) for e in events}
    assert {("association", "accepted"), ("association", "released"), ("job", "predicted")} <= kinds
    assert {("send", "sent"), ("request", "accepted")} <= kinds
    source = pydicom.dcmread(study[0], stop_before_pixels=True)
    (job,) = [e for e in events if e["event"] == "job"]
    assert job["series"] == tag(source.SeriesInstanceUID) and job["model_version"] == "fp32-test"
    released = next(e for e in events if e["outcome"] == "released")
    assert released["instances"] == {"stored": len(study)} and released["calling_ae"] == "PACS"
    text = node.cfg.audit_path.read_text()
    for value in (source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID):
        assert value not in text
    assert str(source.PatientID) not in text and source.PatientName.family_name not in text


def test_https_listener_with_client_certificates_and_a_verified_stow_rs_send(
    tmp_path, tiny_package, study, monkeypatch
):
    import ssl

    import httpx
    import yaml

    from ctpipe.serve.config import Destination, Tls
    from ctpipe.serve.send import SendError, stow

    certs = make_certs(tmp_path / "certs")
    raw = make_cfg(tmp_path, tiny_package, None)
    raw["http"].update(
        port=free_port(),
        tls={
            "cert": str(certs["server"]),
            "key": str(certs["server_key"]),
            "ca": str(certs["ca"]),
            "require_client_cert": True,
        },
    )
    token = make_tokens(tmp_path)["test"]
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(raw))
    proc = start_serve(tmp_path)
    url = f"https://127.0.0.1:{raw['http']['port']}"

    def context(cert: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=certs["ca"])
        if cert:
            ctx.load_cert_chain(certs[cert], certs[f"{cert}_key"])
        return ctx

    good = httpx.Client(verify=context("client"))
    try:
        wait_for(lambda: good.get(f"{url}/healthz").status_code == 200, 60, "HTTPS")
        headers = {"Authorization": f"Bearer {token}"}
        assert good.get(f"{url}/jobs", headers=headers).status_code == 200
        for cert in ("rogue", None):  # another CA's certificate, none at all
            with pytest.raises(httpx.HTTPError):
                with httpx.Client(verify=context(cert)) as client:
                    client.get(f"{url}/jobs", headers=headers)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port
            httpx.get(url.replace("https", "http") + "/jobs", headers=headers)
        monkeypatch.setenv("CTPIPE_TEST_TOKEN", token)
        tls = Tls(ca=certs["ca"], cert=certs["client"], key=certs["client_key"])
        dest = Destination(
            kind="dicomweb", url=f"{url}/dicom-web", token_env="CTPIPE_TEST_TOKEN", tls=tls
        )
        stow(study[:2], dest)  # the node as a DICOMweb destination, the server verified
        stored = wait_for(lambda: list((tmp_path / "spool" / "incoming").rglob("*.dcm")), 10)
        assert len(stored) == 2
        unverified = dest.model_copy(
            update={"tls": Tls(cert=certs["client"], key=certs["client_key"])}
        )
        with pytest.raises(SendError, match="ConnectError"):  # the test CA is no system CA
            stow(study[:1], unverified)
    finally:
        good.close()
        proc.terminate()
        proc.wait(20)
