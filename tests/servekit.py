"""What the serve tests share: free ports, a destination SCP, a config, a node in this process,
tokens, and test certificates made with ``openssl`` (never committed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom
from fastapi.testclient import TestClient
from pynetdicom import AE, AllStoragePresentationContexts, evt

from ctpipe.serve import config, tokens
from ctpipe.serve.audit import Audit
from ctpipe.serve.dimse import StoreSCP
from ctpipe.serve.runner import Runner
from ctpipe.serve.spool import Spool
from ctpipe.serve.telemetry import Metrics
from ctpipe.serve.web import create_app

ALL_SCOPES = ["store", "read", "metrics"]
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds: float = 180.0, what: str = "a condition"):
    end = time.time() + seconds
    while time.time() < end:
        try:
            value = predicate()
        except (OSError, ValueError, httpx.HTTPError):  # a record being replaced, a port not open
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def stop(*procs: subprocess.Popen, seconds: float = 20) -> None:
    """SIGTERM every process still running, wait up to ``seconds`` for each, SIGKILL the rest:
    the test services (nodes, Orthanc, HAProxy, Prometheus) end as they would in production."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Receiver:
    """A destination SCP that keeps what it is sent (the PACS in these tests); ``contexts``
    limits the SOP classes it accepts."""

    def __init__(self, port: int | None = None, contexts=None, ssl_context=None) -> None:
        self.port, self.received = port or free_port(), []
        ae = AE(ae_title="DEST")
        ae.supported_contexts = contexts or AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.store)],
            ssl_context=ssl_context,
        )

    def store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return 0x0000


def start_serve(folder: Path) -> subprocess.Popen:
    """``python -m ctpipe.serve --config folder/serve.yaml`` as a process of its own, logging
    to ``folder/serve.log`` (appended: a restart keeps what came before)."""
    return subprocess.Popen(
        [sys.executable, "-m", "ctpipe.serve", "--config", str(folder / "serve.yaml")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=open(folder / "serve.log", "ab"),
        stderr=subprocess.STDOUT,
    )


def receive_all(spool, files: list[Path]) -> None:
    """Put every file of one series into ``spool`` as if it had been received."""
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spool.receive(
            path.read_bytes(), ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        )


def make_tokens(folder: Path, scopes: dict[str, list[str]] | None = None) -> dict[str, str]:
    """A tokens file ``folder/tokens.yaml`` with one token per name; returns name -> token."""
    scopes = scopes or {"test": ALL_SCOPES}
    folder.mkdir(parents=True, exist_ok=True)
    return {name: tokens.add(folder / "tokens.yaml", name, s) for name, s in scopes.items()}


def make_cfg(tmp_path: Path, package: Path, receiver: Receiver | None, **changes) -> dict:
    """A node config (the raw dict; ``config.parse`` checks it) for the tests."""
    cfg = {
        "host": "127.0.0.1",
        "package": str(package),
        "model": "fp32",
        "spool_dir": str(tmp_path / "spool"),
        "workers": 1,
        "quiet_seconds": 0.5,
        "predict_timeout_seconds": 300,
        "limits": {"max_request_mb": 64, "max_study_mb": 64, "min_free_disk_mb": 0},
        "dicom": {
            "ae_title": "CTPIPE",
            "port": free_port(),
            "allowed_callers": [{"ae_title": "PACS", "host": "127.0.0.1"}, {"ae_title": "ANY"}],
        },
        "http": {"port": 0, "tokens_file": str(tmp_path / "tokens.yaml")},
        "destination": {
            "kind": "dicom",
            "ae_title": "DEST",
            "host": "127.0.0.1",
            "port": receiver.port,
        }
        if receiver
        else {"kind": "none"},
        "retry": {"first_seconds": 0.2, "max_seconds": 1, "max_attempts": 10},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


class InProcessNode:
    """Spool, runner, SCP and the HTTP app of one node in this process (TestClient for HTTP)."""

    def __init__(self, raw: dict, token_scopes: dict[str, list[str]] | None = None) -> None:
        folder = Path(raw["http"]["tokens_file"]).parent
        self.tokens = make_tokens(folder, token_scopes)
        self.cfg = config.parse(raw)
        self.metrics = Metrics("fp32-test")
        limits = self.cfg.limits
        self.spool = Spool(
            self.cfg.spool_dir,
            self.cfg.quiet_seconds,
            int(limits.max_study_mb * (1 << 20)),
            int(limits.min_free_disk_mb * (1 << 20)),
        )
        self.audit = Audit(self.cfg.audit_path)
        self.runner = Runner(self.spool, self.cfg, self.metrics, self.audit)
        self.scp = StoreSCP(self.cfg, self.spool, self.metrics, self.audit)
        app = create_app(
            self.cfg, self.spool, self.metrics, tokens.load(self.cfg.http.tokens_file), self.audit
        )
        self.client = TestClient(app)

    def start(self, runner: bool = True) -> InProcessNode:
        if runner:
            self.runner.start()
        self.scp.start()
        return self

    def auth(self, name: str = "test") -> dict:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def audit_lines(self) -> list[str]:
        return self.cfg.audit_path.read_text().splitlines()

    def close(self) -> None:
        self.scp.shutdown()
        self.runner.shutdown()
        self.audit.close()


def make_certs(folder: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 / localhost, a client certificate, and a
    rogue client certificate from another CA; PEM files in ``folder`` (``X.pem``, ``X.key``, and
    ``X.both.pem`` with both, as Orthanc wants them)."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN=ctpipe test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")  # fmt: skip
    san = "subjectAltName=IP:127.0.0.1,DNS:localhost"
    for name, ca in (("server", "ca"), ("client", "ca"), ("rogue", "rogue-ca")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
            f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        (folder / f"{name}.ext").write_text(san + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")  # fmt: skip
        both = (folder / f"{name}.pem").read_text() + (folder / f"{name}.key").read_text()
        (folder / f"{name}.both.pem").write_text(both)
    return {p.stem.replace(".", "_"): p for p in folder.glob("*.pem")} | {
        f"{p.stem}_key": p for p in folder.glob("*.key")
    }


ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """Orthanc (the PACS) as a process on free localhost ports; ``modalities`` maps a name to
    (AE title, port) of the nodes it may send to."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, int]]) -> None:
        import json
        import shutil

        self.folder, self.http_port, self.dicom_port = folder, free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "ctpipe-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": {k: [ae, "127.0.0.1", port] for k, (ae, port) in modalities.items()},
        }
        (folder / "orthanc.json").write_text(json.dumps(cfg))
        self.proc = subprocess.Popen(
            [shutil.which("Orthanc") or "Orthanc", str(folder / "orthanc.json")],
            stdout=open(folder / "orthanc.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=60)
        wait_for(lambda: self.get("/system"), 60, "Orthanc")

    def get(self, path: str):
        response = self.http.get(path)
        response.raise_for_status()
        return response.json() if "json" in response.headers.get("content-type", "") else response

    def post(self, path: str, body) -> dict:
        import json

        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.http.post(path, content=data)
        response.raise_for_status()
        return response.json()

    def upload(self, files: list[Path]) -> str:
        """Store ``files`` (one study) in Orthanc; its Orthanc study id."""
        return [self.post("/instances", p.read_bytes()) for p in files][-1]["ParentStudy"]

    def store(self, modality: str, study_id: str) -> None:
        self.post(f"/modalities/{modality}/store", {"Resources": [study_id], "Synchronous": True})

    def results(self, study_id: str) -> dict[str, list[str]]:
        """Modality -> SOP Instance UIDs of the study's SEG and SR series in Orthanc."""
        out: dict[str, list[str]] = {}
        for series in self.get(f"/studies/{study_id}/series"):
            modality = series["MainDicomTags"].get("Modality")
            if modality in ("SEG", "SR"):
                for instance in series["Instances"]:
                    tags = self.get(f"/instances/{instance}/simplified-tags")
                    out.setdefault(modality, []).append(tags["SOPInstanceUID"])
        return out

    def close(self) -> None:
        stop(self.proc)
        self.http.close()
