"""ctpipe's DICOM node against a real PACS: Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``)
sends a study to ``python -m ctpipe.serve`` by C-STORE, and by STOW-RS through its DICOMweb
plugin; the SEG and SR must come back into the same study in Orthanc, reference the source
series, and carry the nodules ctpipe found. ``.ci/run`` installs Orthanc; elsewhere these tests
are skipped (``apt-get install -y orthanc orthanc-dicomweb``)."""

from __future__ import annotations

import io
import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml
from servekit import make_certs, make_tokens, start_serve, stop

ROOT = Path(__file__).resolve().parents[1]
ORTHANC = shutil.which("Orthanc")
DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
pytestmark = [
    pytest.mark.skipif(
        ORTHANC is None or not DICOMWEB.is_file(),
        reason="needs Orthanc: apt-get install -y orthanc orthanc-dicomweb (.ci/run does)",
    ),
    pytest.mark.filterwarnings("ignore"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds: float, what: str):
    end = time.time() + seconds
    while time.time() < end:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - not up yet
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


class Node:
    """Orthanc and ctpipe serve as processes on free localhost ports."""

    def __init__(
        self, tmp: Path, package: Path, destination: str, tls: bool = False, dest_port=None
    ) -> None:
        import httpx

        self.http = httpx.Client(timeout=60)
        self.tmp = tmp
        self.o_http, self.o_dicom = free_port(), free_port()
        self.c_http, self.c_dicom = free_port(), free_port()
        self.certs = make_certs(tmp / "certs") if tls else None
        self.token = make_tokens(tmp, {"orthanc": ["store", "read", "metrics"]})["orthanc"]
        orthanc = {
            "Name": "ctpipe-test",
            "StorageDirectory": str(tmp / "orthanc-db"),
            "IndexDirectory": str(tmp / "orthanc-db"),
            "HttpPort": self.o_http,
            "DicomPort": self.o_dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {"ctpipe": ["CTPIPE", "127.0.0.1", self.c_dicom]},
            "Plugins": [str(DICOMWEB)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "Servers": {
                    "ctpipe": {
                        "Url": f"http://127.0.0.1:{self.c_http}/dicom-web/",
                        "HttpHeaders": {"Authorization": f"Bearer {self.token}"},
                    }
                },
            },
        }
        if tls:  # DICOM TLS both ways, each side requiring the other's certificate
            orthanc.update(
                DicomTlsEnabled=True,
                DicomTlsCertificate=str(self.certs["server"]),
                DicomTlsPrivateKey=str(self.certs["server_key"]),
                DicomTlsTrustedCertificates=str(self.certs["ca"]),
                DicomTlsRemoteCertificateRequired=True,
                DicomModalities={
                    "ctpipe": {
                        "AET": "CTPIPE",
                        "Host": "127.0.0.1",
                        "Port": self.c_dicom,
                        "UseDicomTls": True,
                    }
                },
            )
        (tmp / "orthanc.json").write_text(json.dumps(orthanc))
        self.orthanc = subprocess.Popen(
            [ORTHANC, str(tmp / "orthanc.json")],
            stdout=open(tmp / "orthanc.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        if destination == "dicom":
            dest = {
                "kind": "dicom",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": dest_port or self.o_dicom,
            }
        else:
            dest = {"kind": "dicomweb", "url": f"http://127.0.0.1:{self.o_http}/dicom-web"}
        cfg = yaml.safe_load((ROOT / "serve.yaml").read_text())
        cfg.update(
            package=str(package),
            spool_dir=str(tmp / "spool"),
            quiet_seconds=1,
            allow_plaintext=destination == "dicomweb",  # Orthanc's DICOMweb here: plain HTTP
            destination={**cfg["destination"], **dest},
            retry={"first_seconds": 0.5, "max_seconds": 2, "max_attempts": 100},
        )
        cfg["dicom"].update(port=self.c_dicom)
        cfg["http"].update(port=self.c_http, tokens_file=str(tmp / "tokens.yaml"))
        if tls:
            cfg["dicom"]["tls"] = {
                "cert": str(self.certs["server"]),
                "key": str(self.certs["server_key"]),
                "ca": str(self.certs["ca"]),
                "require_client_cert": True,
            }
            cfg["destination"]["tls"] = {
                "ca": str(self.certs["ca"]),
                "cert": str(self.certs["client"]),
                "key": str(self.certs["client_key"]),
            }
        self.cfg = cfg
        (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))
        self.serve = self.start_serve()
        wait_for(lambda: self.orthanc_get("/system"), 60, "Orthanc")
        wait_for(lambda: self.http.get(self.c_url("/healthz")).status_code == 200, 60, "serve")

    def start_serve(self) -> subprocess.Popen:
        return start_serve(self.tmp)

    def c_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.c_http}{path}"

    def orthanc_get(self, path: str):
        response = self.http.get(f"http://127.0.0.1:{self.o_http}{path}")
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("content-type", "") else response

    def orthanc_post(self, path: str, body) -> dict:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.http.post(f"http://127.0.0.1:{self.o_http}{path}", content=data)
        response.raise_for_status()
        return response.json()

    def upload(self, files: list[Path]) -> str:
        study = ""
        for path in files:
            study = self.orthanc_post("/instances", path.read_bytes())["ParentStudy"]
        return study

    def jobs(self) -> list[dict]:
        response = self.http.get(self.c_url("/jobs"), headers=self.auth())
        return response.json()

    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def restart(self, **changes) -> None:
        """Stop ctpipe serve, change its config, start it again."""
        self.serve.send_signal(signal.SIGTERM)
        self.serve.wait(30)
        for key, value in changes.items():
            self.cfg[key] = {**self.cfg[key], **value} if isinstance(value, dict) else value
        (self.tmp / "serve.yaml").write_text(yaml.safe_dump(self.cfg))
        self.serve = self.start_serve()
        wait_for(lambda: self.http.get(self.c_url("/healthz")).status_code == 200, 60, "serve")

    def close(self) -> None:
        stop(self.serve, self.orthanc)
        self.http.close()


@pytest.fixture
def study(tmp_path, write_tiny_cohort) -> list[Path]:
    write_tiny_cohort(tmp_path / "study", n=1, seed=33)
    return sorted((tmp_path / "study").rglob("*.dcm"))


def results_in_orthanc(node: Node, study_id: str) -> dict[str, pydicom.Dataset]:
    """SEG and SR instances of the study, once both are there."""

    def found():
        series = node.orthanc_get(f"/studies/{study_id}/series")
        kinds = {s["MainDicomTags"].get("Modality"): s for s in series}
        if not {"SEG", "SR"} <= set(kinds):
            return None
        out = {}
        for kind in ("SEG", "SR"):
            (instance,) = kinds[kind]["Instances"]
            data = node.orthanc_get(f"/instances/{instance}/file").content
            out[kind] = pydicom.dcmread(io.BytesIO(data))
        return out

    return wait_for(found, 300, "SEG and SR in Orthanc")


def check_round_trip(node: Node, study: list[Path], study_id: str) -> None:
    from ctpipe.deploy import report

    results = results_in_orthanc(node, study_id)
    source = pydicom.dcmread(study[0], stop_before_pixels=True)
    seg, sr = results["SEG"], results["SR"]
    for ds in (seg, sr):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    (job,) = wait_for(lambda: [j for j in node.jobs() if j["send"] == "sent"], 30, "the record")
    assert job["status"] == "predicted" and job["instances"] == len(study)
    assert len(node.jobs()) == 1  # one series, one job
    nodules = pd.read_csv(
        node.tmp / "spool" / "jobs" / job["id"] / "out" / source.SeriesInstanceUID / "nodules.csv"
    )
    assert len(nodules) > 0
    sr.save_as(node.tmp / "sr_from_orthanc.dcm")
    measured = report.read_sr(node.tmp / "sr_from_orthanc.dcm")
    assert len(measured) == len(nodules)
    for column in ("diameter_mm", "volume_mm3"):
        assert sorted(measured[column].round(1)) == sorted(nodules[column].round(1))


def test_orthanc_c_store_round_trip_with_a_failing_send_and_no_phi_anywhere(
    tmp_path, study, density_package
):
    """The destination is wrong at first (a closed port): the send fails and is retried; after
    the config is corrected and the node restarted, the results arrive. No log line, audit
    event or API answer carries a UID of the study or the patient's name or ID."""
    node = Node(tmp_path, density_package, destination="dicom", dest_port=free_port())
    try:
        study_id = node.upload(study)
        node.orthanc_post(
            "/modalities/ctpipe/store", {"Resources": [study_id], "Synchronous": True}
        )
        wait_for(lambda: [j for j in node.jobs() if j["attempts"] >= 2], 300, "failed sends")
        answers = [node.http.get(node.c_url(p), headers=node.auth()).text for p in API]
        node.restart(destination={"port": node.o_dicom})
        check_round_trip(node, study, study_id)
        answers += [node.http.get(node.c_url(p), headers=node.auth()).text for p in API]
    finally:
        node.close()
    assert "send retrying" in (tmp_path / "serve.log").read_text()  # the failure was logged
    source = pydicom.dcmread(study[0], stop_before_pixels=True)
    secrets = [source.StudyInstanceUID, source.SeriesInstanceUID, source.PatientID]
    secrets += [str(source.PatientName), source.PatientName.family_name]
    secrets += [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study]
    texts = {
        "serve.log": (tmp_path / "serve.log").read_text(),
        "audit": (tmp_path / "spool" / "audit.jsonl").read_text(),
        **{f"answer {i}": text for i, text in enumerate(answers)},
    }
    for name, text in texts.items():
        for value in secrets:
            assert value not in text, (name, "carries an identifying value")


API = ("/jobs", "/metrics", "/readyz", "/healthz")


def test_orthanc_dicom_tls_both_ways_and_a_caller_without_a_good_certificate(
    tmp_path, study, density_package
):
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = Node(tmp_path, density_package, destination="dicom", tls=True)
    try:
        study_id = node.upload(study)
        node.orthanc_post(  # Orthanc -> ctpipe over TLS
            "/modalities/ctpipe/store", {"Resources": [study_id], "Synchronous": True}
        )
        check_round_trip(node, study, study_id)  # ctpipe -> Orthanc over TLS
        for cert in ("rogue", None):  # a certificate from another CA, none at all
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=node.certs["ca"])
            if cert:
                ctx.load_cert_chain(node.certs[cert], node.certs[f"{cert}_key"])
            ae = AE(ae_title="ORTHANC")
            ae.add_requested_context(Verification)
            assoc = ae.associate(
                "127.0.0.1", node.c_dicom, ae_title="CTPIPE", tls_args=(ctx, "127.0.0.1")
            )
            assert not assoc.is_established
        audit = (tmp_path / "spool" / "audit.jsonl").read_text()
        assert audit.count("TLS handshake failed") == 2
    finally:
        node.close()


def test_orthanc_stow_rs_round_trip(tmp_path, study, density_package):
    node = Node(tmp_path, density_package, destination="dicomweb")
    try:
        study_id = node.upload(study)
        node.orthanc_post(
            "/dicom-web/servers/ctpipe/stow", {"Resources": [study_id], "Synchronous": True}
        )
        check_round_trip(node, study, study_id)
    finally:
        node.close()
