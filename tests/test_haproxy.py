"""HAProxy (Debian's ``haproxy``) in front of two receivers, with ``deploy/haproxy/haproxy.cfg``
itself (its addresses from the environment): DICOM associations and STOW-RS requests spread over
both nodes, and go to the survivor when one stops. Skipped without haproxy
(``apt-get install -y haproxy``; ``.ci/run`` installs it).

The nodes are ``python -m ctpipe.serve`` processes with a long ``quiet_seconds``, so no series
becomes a job: what is checked is where each instance was stored, not prediction."""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid
from pynetdicom import AE, StoragePresentationContexts
from servekit import free_port, make_cfg, make_tokens, start_serve, stop, wait_for

from ctpipe.serve.send import multipart_related

ROOT = Path(__file__).resolve().parents[1]
HAPROXY = shutil.which("haproxy")
CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="needs haproxy: apt-get install -y haproxy (.ci/run does)"
)


class Balanced:
    """Two nodes (``node1``, ``node2`` folders under ``tmp``) and HAProxy in front of them."""

    def __init__(self, tmp: Path, package: Path) -> None:
        self.tmp = tmp
        self.token = make_tokens(tmp)["test"]  # one tokens file, mounted on both nodes
        self.nodes: dict[str, dict] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        for name in ("node1", "node2"):
            folder = tmp / name
            folder.mkdir()
            cfg = make_cfg(
                folder,
                package,
                None,
                quiet_seconds=3600,  # never a job: the test looks at what each node stored
                http={"port": free_port(), "tokens_file": str(tmp / "tokens.yaml")},
            )
            (folder / "serve.yaml").write_text(yaml.safe_dump(cfg))
            self.nodes[name] = cfg
            self.procs[name] = start_serve(folder)
        self.dicom, self.http, self.stats = free_port(), free_port(), free_port()
        env = {
            **os.environ,
            "CTPIPE_LB_DICOM": f"127.0.0.1:{self.dicom}",
            "CTPIPE_LB_HTTP": f"127.0.0.1:{self.http}",
            "CTPIPE_LB_STATS": f"127.0.0.1:{self.stats}",
        }
        for i, cfg in enumerate(self.nodes.values(), start=1):
            env[f"CTPIPE_NODE{i}"] = "127.0.0.1"
            env[f"CTPIPE_NODE{i}_DICOM"] = str(cfg["dicom"]["port"])
            env[f"CTPIPE_NODE{i}_HTTP"] = str(cfg["http"]["port"])
        self.haproxy = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(CONFIG)],
            env=env,
            stdout=open(tmp / "haproxy.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        for name in self.nodes:
            wait_for(lambda n=name: self.status(n) == {"UP"}, 90, f"{name} up in HAProxy")

    def status(self, node: str) -> set[str]:
        """The node's state in both backends, as HAProxy's CSV statistics give it."""
        text = httpx.get(f"http://127.0.0.1:{self.stats}/stats;csv", timeout=5).text
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["status"] for r in rows if r["svname"] == node}

    def stored(self, node: str) -> set[str]:
        """SOP Instance UIDs of the instances the node has received."""
        spool = Path(self.nodes[node]["spool_dir"])
        return {p.stem for p in (spool / "incoming").glob("*/*/*.dcm")}

    def stop(self, node: str) -> None:
        proc = self.procs[node]
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    def close(self) -> None:
        stop(self.haproxy, *self.procs.values())


@pytest.fixture(scope="module")
def balanced(tmp_path_factory, density_package):
    lb = Balanced(tmp_path_factory.mktemp("haproxy"), density_package)
    yield lb
    lb.close()


@pytest.fixture(scope="module")
def slices(tmp_path_factory, write_tiny_cohort) -> list[pydicom.Dataset]:
    """Three CT slices; each series the tests send is a copy with new UIDs."""
    folder = tmp_path_factory.mktemp("study")
    write_tiny_cohort(folder, n=1, seed=5)
    return [pydicom.dcmread(p) for p in sorted(folder.rglob("*.dcm"))[:3]]


def new_series(slices: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    study, series = generate_uid(), generate_uid()
    out = []
    for ds in slices:
        ds = ds.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


def c_store(port: int, series: list[pydicom.Dataset]) -> list[int]:
    """One association through the balancer; the status of each C-STORE."""
    ae = AE(ae_title="ANY")
    ae.requested_contexts = StoragePresentationContexts
    assoc = ae.associate("127.0.0.1", port, ae_title="CTPIPE")
    assert assoc.is_established, "association through HAProxy refused"
    try:
        return [assoc.send_c_store(ds).Status for ds in series]
    finally:
        assoc.release()


def stow(lb: Balanced, series: list[pydicom.Dataset]) -> httpx.Response:
    blobs = []
    for ds in series:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        blobs.append(buffer.getvalue())
    body, ctype = multipart_related(blobs)
    return httpx.post(
        f"http://127.0.0.1:{lb.http}/dicom-web/studies",
        content=body,
        headers={"Content-Type": ctype, "Authorization": f"Bearer {lb.token}"},
        timeout=60,
    )


def uids(series: list[pydicom.Dataset]) -> set[str]:
    return {ds.SOPInstanceUID for ds in series}


def test_haproxy_spreads_associations_and_stow_rs_over_both_nodes(balanced, slices):
    sent: set[str] = set()
    for _ in range(6):
        series = new_series(slices)
        assert c_store(balanced.dicom, series) == [0x0000] * len(series)
        sent |= uids(series)
    by_dicom = {n: balanced.stored(n) & sent for n in balanced.nodes}
    assert by_dicom["node1"] | by_dicom["node2"] == sent  # every instance stored
    assert not by_dicom["node1"] & by_dicom["node2"]  # each once
    assert by_dicom["node1"] and by_dicom["node2"], "one node got every association"
    posted: set[str] = set()
    for _ in range(4):
        series = new_series(slices)
        assert stow(balanced, series).status_code == 200
        posted |= uids(series)
    by_http = {n: balanced.stored(n) & posted for n in balanced.nodes}
    assert by_http["node1"] | by_http["node2"] == posted
    assert by_http["node1"] and by_http["node2"], "one node got every STOW-RS request"
    unauthorised = httpx.post(f"http://127.0.0.1:{balanced.http}/dicom-web/studies", content=b"")
    assert unauthorised.status_code == 401  # the token is checked behind the balancer too


def test_haproxy_sends_everything_to_the_survivor_when_a_node_stops(balanced, slices):
    balanced.stop("node1")
    # at once, before the health check has noticed: refused connections are dispatched again
    first = new_series(slices)
    assert c_store(balanced.dicom, first) == [0x0000] * len(first)
    assert stow(balanced, new_series(slices)).status_code == 200
    wait_for(lambda: balanced.status("node1") == {"DOWN"}, 30, "node1 marked down")
    assert balanced.status("node2") == {"UP"}
    later: set[str] = set()
    for _ in range(3):
        series = new_series(slices)
        assert c_store(balanced.dicom, series) == [0x0000] * len(series)
        assert stow(balanced, (posted := new_series(slices))).status_code == 200
        later |= uids(series) | uids(posted)
    assert later | uids(first) <= balanced.stored("node2")
    health = httpx.get(f"http://127.0.0.1:{balanced.http}/healthz", timeout=10)
    assert health.status_code == 200
