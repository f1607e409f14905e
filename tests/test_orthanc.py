"""ctpipe's DICOM node against a real PACS: Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``)
sends a study to ``python -m ctpipe.serve`` by C-STORE, and by STOW-RS through its DICOMweb
plugin; the SEG and SR must come back into the same study in Orthanc, reference the source
series, and carry the nodules ctpipe found. ``.ci/run`` installs Orthanc; elsewhere these tests
are skipped (``apt-get install -y orthanc orthanc-dicomweb``)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ORTHANC = shutil.which("Orthanc")
DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
TOKEN = "orthanc-test-token-0123456789"
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

    def __init__(self, tmp: Path, package: Path, destination: str) -> None:
        import httpx

        self.http = httpx.Client(timeout=60)
        self.tmp = tmp
        self.o_http, self.o_dicom = free_port(), free_port()
        self.c_http, self.c_dicom = free_port(), free_port()
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
                        "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
                    }
                },
            },
        }
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
                "port": self.o_dicom,
            }
        else:
            dest = {"kind": "dicomweb", "url": f"http://127.0.0.1:{self.o_http}/dicom-web"}
        cfg = yaml.safe_load((ROOT / "serve.yaml").read_text())
        cfg.update(
            package=str(package),
            spool_dir=str(tmp / "spool"),
            quiet_seconds=1,
            destination={**cfg["destination"], **dest},
        )
        cfg["dicom"].update(port=self.c_dicom)
        cfg["http"].update(port=self.c_http)
        (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))
        self.serve = self.start_serve()
        wait_for(lambda: self.orthanc_get("/system"), 60, "Orthanc")
        wait_for(lambda: self.http.get(self.c_url("/healthz")).status_code == 200, 60, "serve")

    def start_serve(self) -> subprocess.Popen:
        env = {**os.environ, "CTPIPE_SERVE_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(
            [sys.executable, "-m", "ctpipe.serve", "--config", str(self.tmp / "serve.yaml")],
            cwd=ROOT,
            env=env,
            stdout=open(self.tmp / "serve.log", "ab"),
            stderr=subprocess.STDOUT,
        )

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
        response = self.http.get(self.c_url("/jobs"), headers={"Authorization": f"Bearer {TOKEN}"})
        return response.json()

    def close(self) -> None:
        for proc in (self.serve, self.orthanc):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
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


def test_orthanc_c_store_round_trip(tmp_path, study, density_package):
    node = Node(tmp_path, density_package, destination="dicom")
    try:
        study_id = node.upload(study)
        node.orthanc_post(
            "/modalities/ctpipe/store", {"Resources": [study_id], "Synchronous": True}
        )
        check_round_trip(node, study, study_id)
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
