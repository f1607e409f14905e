"""The container image (deploy/Containerfile) next to a real PACS: Orthanc sends a study to the
node running in the container by C-STORE, and the SEG and SR come back into Orthanc. The same
image runs ``python -m ctpipe.predict`` on a mounted study folder, runs as a non-root user, passes
its own HEALTHCHECK, and has no PyTorch.

The image is built once per session (tests/imagekit.py; skipped without podman, runc, debootstrap
or root, with the install command); Orthanc as in tests/test_orthanc.py (skipped without it)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import imagekit
import pydicom
import pytest
import yaml
from imagekit import USER_ID, podman
from servekit import Orthanc, free_port, make_tokens, wait_for

ORTHANC = shutil.which("Orthanc")
ctpipe_image = imagekit.ctpipe_image  # the session fixture: the image, built once
pytestmark = [
    imagekit.SKIP,
    pytest.mark.skipif(
        ORTHANC is None, reason="needs Orthanc: apt-get install -y orthanc (.ci/run does)"
    ),
    pytest.mark.filterwarnings("ignore"),
]
CONFIG_DIR, SPOOL = "/etc/ctpipe", "/var/lib/ctpipe/spool"


def readable_by_image_user(folder: Path) -> None:
    """Mounted config and secrets belong to the image's user (as a Kubernetes fsGroup or a
    ``chown`` on the host would make them); the files stay owner-only."""
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, USER_ID, USER_ID)


class Containerised:
    """Orthanc as a process and the node as a container (host network), on free ports."""

    def __init__(self, tmp: Path, image: str) -> None:
        self.tmp, self.image = tmp, image
        self.name = f"ctpipe-test-{uuid.uuid4().hex[:8]}"
        self.volume = f"{self.name}-spool"
        self.c_http, self.c_dicom = free_port(), free_port()
        self.orthanc = Orthanc(tmp / "orthanc", {"ctpipe": ("CTPIPE", self.c_dicom)})
        etc = tmp / "etc"
        self.token = make_tokens(etc, {"orthanc": ["store", "read", "metrics"]})["orthanc"]
        cfg = yaml.safe_load((Path(__file__).parents[1] / "serve.yaml").read_text())
        cfg.update(
            package="models/export",  # the baked-in package, under the image's working directory
            spool_dir=SPOOL,
            quiet_seconds=1,
            monitor={"reference": None},
            destination={
                "kind": "dicom",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": self.orthanc.dicom_port,
            },  # fmt: skip
            retry={"first_seconds": 0.5, "max_seconds": 2, "max_attempts": 100},
        )
        cfg["dicom"].update(port=self.c_dicom)
        cfg["http"].update(port=self.c_http, tokens_file=f"{CONFIG_DIR}/tokens.yaml")
        (etc / "serve.yaml").write_text(yaml.safe_dump(cfg))
        readable_by_image_user(etc)
        subprocess.run(
            podman("run", "-d", "--name", self.name, "--network", "host",
                   "-v", f"{etc}:{CONFIG_DIR}:ro", "-v", f"{self.volume}:{SPOOL}", image),
            check=True, capture_output=True,
        )  # fmt: skip
        self.http = httpx.Client(timeout=60)
        wait_for(lambda: self.get(f"{self.c_url}/healthz").status_code == 200, 120, "the node")

    @property
    def c_url(self) -> str:
        return f"http://127.0.0.1:{self.c_http}"

    def get(self, url: str) -> httpx.Response:
        return self.http.get(url, headers={"Authorization": f"Bearer {self.token}"})

    def exec(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(podman("exec", self.name, *cmd), capture_output=True, text=True)

    def logs(self) -> str:
        result = subprocess.run(podman("logs", self.name), capture_output=True, text=True)
        return result.stdout + result.stderr

    def close(self) -> None:
        subprocess.run(podman("rm", "-f", "-t", "10", self.name), capture_output=True)
        subprocess.run(podman("volume", "rm", "-f", self.volume), capture_output=True)
        self.orthanc.close()
        self.http.close()


@pytest.fixture(scope="module")
def node(tmp_path_factory, ctpipe_image):
    running = Containerised(tmp_path_factory.mktemp("container"), ctpipe_image)
    yield running
    running.close()


@pytest.fixture(scope="module")
def study(tmp_path_factory, write_tiny_cohort) -> list[Path]:
    folder = tmp_path_factory.mktemp("study")
    write_tiny_cohort(folder, n=1, seed=33)
    return sorted(folder.rglob("*.dcm"))


def test_container_c_store_round_trip_with_orthanc(node, study):
    study_id = ""
    for path in study:
        study_id = node.orthanc.post("/instances", path.read_bytes())["ParentStudy"]
    node.orthanc.post("/modalities/ctpipe/store", {"Resources": [study_id], "Synchronous": True})

    def results():
        failed = [j for j in node.get(f"{node.c_url}/jobs").json() if j["status"] == "failed"]
        assert not failed, failed  # no need to wait out the time limit
        series = node.orthanc.get(f"/studies/{study_id}/series")
        kinds = {s["MainDicomTags"].get("Modality"): s for s in series}
        return kinds if {"SEG", "SR"} <= set(kinds) else None

    try:
        kinds = wait_for(results, 300, "SEG and SR in Orthanc")
    except AssertionError as err:
        jobs = node.get(f"{node.c_url}/jobs").text
        raise AssertionError(f"{err}\njobs: {jobs}\nnode log:\n{node.logs()[-3000:]}") from None
    source = pydicom.dcmread(study[0], stop_before_pixels=True)
    (seg_id,) = kinds["SEG"]["Instances"]
    seg = pydicom.dcmread(io.BytesIO(node.orthanc.get(f"/instances/{seg_id}/file").content))
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    (job,) = wait_for(lambda: node.get(f"{node.c_url}/jobs").json(), 30, "the job")
    assert job["status"] == "predicted" and job["instances"] == len(study)
    ready = node.get(f"{node.c_url}/readyz").json()
    assert ready["ready"] and ready["model"] and ready["queue_writable"]


def test_container_runs_as_its_own_user_without_torch_and_is_healthy(node):
    assert node.exec("id", "-u").stdout.strip() == str(USER_ID)
    spool = node.exec("stat", "-c", "%u %a", SPOOL).stdout.split()
    assert spool == [str(USER_ID), "700"]  # the volume: the node's user only
    no_torch = node.exec("python", "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    health = subprocess.run(podman("healthcheck", "run", node.name), capture_output=True)
    assert health.returncode == 0, health.stderr  # the image's HEALTHCHECK (ctpipe.serve.probe)
    inspect = subprocess.run(
        podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", node.image),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "ctpipe.serve.probe" in inspect.stdout


def test_container_runs_predict_on_a_mounted_study(tmp_path, ctpipe_image, study):
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, USER_ID, USER_ID)
    readable_by_image_user(study[0].parent)  # whatever the umask it was written with
    result = subprocess.run(
        podman("run", "--rm", "--network", "none", "--entrypoint", "python",
               "-v", f"{study[0].parent}:/study:ro", "-v", f"{out}:/out", ctpipe_image,
               "-m", "ctpipe.predict", "/study", "/out"),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    uid = pydicom.dcmread(study[0], stop_before_pixels=True).SeriesInstanceUID
    for name in ("seg.dcm", "sr.dcm", "nodules.csv"):
        assert (out / uid / name).is_file(), name
    assert pydicom.dcmread(out / uid / "seg.dcm").Modality == "SEG"
    assert pydicom.dcmread(out / uid / "sr.dcm").Modality == "SR"
