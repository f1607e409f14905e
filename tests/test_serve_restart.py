"""``python -m ctpipe.serve`` killed with SIGKILL while receiving and while predicting, then
started again: every acknowledged instance is processed, the series makes one job, and the
destination gets one SEG and one SR (nothing lost, nothing sent twice)."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage
from servekit import start_serve

from ctpipe.serve import tokens

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, seconds: float, what: str, every: float = 0.2):
    end = time.time() + seconds
    while time.time() < end:
        try:
            value = predicate()
        except (OSError, ValueError):  # a record being replaced, a port not open yet
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def setup(tmp_path, tiny_package, write_tiny_cohort):
    received = []

    def store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    dest_port = free_port()
    dest = AE(ae_title="DEST")
    dest.supported_contexts = AllStoragePresentationContexts
    server = dest.start_server(
        ("127.0.0.1", dest_port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
    )
    cfg = yaml.safe_load((ROOT / "serve.yaml").read_text())
    # quiet period longer than a restart: the two halves sent around the kill make one series
    cfg.update(package=str(tiny_package), spool_dir=str(tmp_path / "spool"), quiet_seconds=15)
    cfg["dicom"].update(port=free_port(), allowed_callers=[{"ae_title": "PACS"}])
    cfg["http"].update(port=free_port(), tokens_file=str(tmp_path / "tokens.yaml"))
    tokens.add(tmp_path / "tokens.yaml", "test", ["read"])
    cfg["destination"] = {
        "kind": "dicom",
        "ae_title": "DEST",
        "host": "127.0.0.1",
        "port": dest_port,
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    write_tiny_cohort(tmp_path / "study", n=1, seed=44, z_extent_mm=300)
    files = sorted((tmp_path / "study").rglob("*.dcm"))
    yield tmp_path, cfg, files, received
    server.shutdown()


def start(tmp_path: Path) -> subprocess.Popen:
    return start_serve(tmp_path)


def c_store(cfg: dict, files: list[Path]) -> list[int]:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = wait_for(
        lambda: (
            (a := ae.associate("127.0.0.1", cfg["dicom"]["port"], ae_title="CTPIPE")).is_established
            and a
        ),
        60,
        "the SCP",
        every=0.5,
    )
    statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in files]
    assoc.release()
    return statuses


def records(tmp_path: Path) -> list[dict]:
    jobs = tmp_path / "spool" / "jobs"
    return [json.loads(p.read_text()) for p in sorted(jobs.glob("*/job.json"))]


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_sigkill_while_receiving_and_while_predicting_loses_and_duplicates_nothing(setup):
    tmp_path, cfg, files, received = setup
    half = len(files) // 2
    proc = start(tmp_path)
    try:
        assert c_store(cfg, files[:half]) == [0] * half
        kill(proc)  # during receive: half the series acknowledged, the series not complete
        proc = start(tmp_path)
        assert c_store(cfg, files[half:]) == [0] * (len(files) - half)
        wait_for(
            lambda: [r for r in records(tmp_path) if r["status"] == "running"],
            120,
            "inference",
            every=0.01,
        )
        kill(proc)  # during inference
        assert [r["status"] for r in records(tmp_path)] == ["running"] and not received
        proc = start(tmp_path)
        wait_for(lambda: [r for r in records(tmp_path) if r.get("send") == "sent"], 300, "results")
        (record,) = records(tmp_path)
        assert record["status"] == "predicted" and record["instances"] == len(files)
        time.sleep(2)  # anything sent twice would arrive now
        assert len(received) == 2 and len(set(received)) == 2  # one SEG, one SR
        source = pydicom.dcmread(files[0], stop_before_pixels=True)
        log = (tmp_path / "serve.log").read_text()
        for value in (source.SeriesInstanceUID, source.StudyInstanceUID, source.PatientID):
            assert value not in log  # logs carry hashed UIDs and no identity
        assert source.PatientName.family_name not in log
        spool = tmp_path / "spool"  # the node's umask: everything it wrote is owner-only
        for path in [spool, *spool.rglob("*")]:
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    finally:
        if proc.poll() is None:
            kill(proc)
