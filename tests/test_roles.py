"""The node as roles over a real RabbitMQ broker (``tests/brokerkit.py``) and a real PACS (Orthanc):
a receiver and two workers as processes sharing one spool folder. Studies go in by C-STORE and
STOW-RS, SEG and SR come back into Orthanc; a worker killed in the middle of a job leaves it to
the other, which makes the same SEG and SR (no second copy under other UIDs); two receivers on one
spool make one job per series; garbage and hostile messages go to the dead-letter queue without
harm; a broker restart makes the workers unready, then ready again; a retrospective run through
the queue gives what local predict gives. Skipped without ``rabbitmq-server`` or Orthanc
(``apt-get install -y rabbitmq-server orthanc``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pika
import pydicom
import pytest
import yaml
from servekit import ROOT, Orthanc, free_port, make_tokens, stop, wait_for

from ctpipe.serve import config
from ctpipe.serve.__main__ import main as serve_main
from ctpipe.serve.send import multipart_related

pytestmark = [
    pytest.mark.skipif(
        shutil.which("Orthanc") is None,
        reason="needs Orthanc: apt-get install -y orthanc (.ci/run does)",
    ),
    pytest.mark.filterwarnings("ignore"),
]
QUEUE = "ctpipe.test-roles"


class Cluster:
    """Orthanc, receivers and workers (processes) sharing ``folder/spool`` and a broker."""

    def __init__(self, folder: Path, package: Path, broker) -> None:
        self.folder, self.broker, self.procs = folder, broker, {}
        self.token = make_tokens(folder, {"t": ["store", "read", "metrics"]})["t"]
        self.ports = {"receiver": free_port(), "receiver2": free_port()}
        modalities = {name: ("CTPIPE", port) for name, port in self.ports.items()}
        self.orthanc = Orthanc(folder / "orthanc", modalities)
        cfg = yaml.safe_load((ROOT / "serve.yaml").read_text())
        cfg.update(
            package=str(package),
            spool_dir=str(folder / "spool"),
            quiet_seconds=1,
            destination={"kind": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1",
                         "port": self.orthanc.dicom_port},
            retry={"first_seconds": 0.5, "max_seconds": 2, "max_attempts": 20},
            queue={"kind": "rabbitmq", "url": broker.url, "name": QUEUE,
                   "shared_roots": [str(folder)]},
        )  # fmt: skip
        cfg["dicom"]["allowed_callers"] = [{"ae_title": "ORTHANC", "host": "127.0.0.1"}]
        cfg["http"]["tokens_file"] = str(folder / "tokens.yaml")
        cfg["monitor"]["reference"] = None
        (folder / "serve.yaml").write_text(yaml.safe_dump(cfg))
        self.http = {}

    def start(self, name: str, role: str) -> subprocess.Popen:
        self.http[name] = free_port()
        args = ["--role", role, "--http-port", str(self.http[name])]
        if role == "receiver":
            args += ["--dicom-port", str(self.ports[name])]
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctpipe.serve", "--config", str(self.folder / "serve.yaml")]
            + args,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=open(self.folder / f"{name}.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        self.procs[name] = proc
        wait_for(lambda: self.ready(name), 120, f"{name} ready")
        return proc

    def ready(self, name: str) -> bool:
        response = httpx.get(f"http://127.0.0.1:{self.http[name]}/readyz", timeout=5)
        return response.status_code == 200

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.http[name]}{path}"

    def records(self) -> list[dict]:
        jobs = self.folder / "spool" / "jobs"
        return [json.loads(p.read_text()) for p in sorted(jobs.glob("*/job.json"))]

    def close(self) -> None:
        stop(*self.procs.values(), seconds=30)
        self.orthanc.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, density_package, rabbitmq):
    node = Cluster(tmp_path_factory.mktemp("roles"), density_package, rabbitmq)
    try:
        node.start("receiver", "receiver")
        node.start("worker1", "worker")
        node.start("worker2", "worker")
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def studies(tmp_path_factory, write_tiny_cohort) -> list[list[Path]]:
    """Three one-series studies, each in a folder of its own."""
    root = tmp_path_factory.mktemp("studies")
    write_tiny_cohort(root, n=3, seed=41)
    return [sorted(p.rglob("*.dcm")) for p in sorted(root.iterdir()) if p.is_dir()]


def sent_jobs(cluster: Cluster, count: int) -> list[dict]:
    return wait_for(
        lambda: (
            (r := [j for j in cluster.records() if j.get("send") == "sent"])
            and len(r) >= count
            and r
        ),
        300,
        f"{count} jobs sent",
    )


def test_a_killed_worker_s_job_is_redelivered_and_nothing_is_duplicated(cluster, studies):
    """Two studies by C-STORE; the worker of the first job to run is killed (SIGKILL) in it:
    the other finishes everything, and each study has one SEG and one SR in Orthanc."""
    ids = [cluster.orthanc.upload(files) for files in studies[:2]]
    for study_id in ids:
        cluster.orthanc.store("receiver", study_id)
    running = wait_for(
        lambda: [j for j in cluster.records() if j["status"] == "running"], 120, "a running job"
    )[0]
    pid = int(running["worker"].rsplit(":", 1)[1])
    victim = next(n for n, p in cluster.procs.items() if p.pid == pid)
    os.kill(pid, signal.SIGKILL)
    cluster.procs[victim].wait(10)
    sent = sent_jobs(cluster, 2)
    again = next(j for j in sent if j["id"] == running["id"])
    assert again["runs"] == 2 and again["worker"] != running["worker"]  # redelivered
    for study_id in ids:
        results = wait_for(
            lambda s=study_id: (r := cluster.orthanc.results(s)) and len(r) == 2 and r,
            120,
            "SEG and SR in Orthanc",
        )
        assert len(results["SEG"]) == 1 and len(results["SR"]) == 1, results
    cluster.start(victim, "worker")  # back to two workers for the next tests


def test_stow_rs_round_trip_and_a_worker_s_http_side(cluster, studies):
    body, ctype = multipart_related([p.read_bytes() for p in studies[2]])
    auth = {"Authorization": f"Bearer {cluster.token}"}
    response = httpx.post(
        cluster.url("receiver", "/dicom-web/studies"),
        content=body,
        headers={**auth, "Content-Type": ctype},
        timeout=60,
    )
    assert response.status_code == 200
    sent_jobs(cluster, 3)
    source = pydicom.dcmread(studies[2][0], stop_before_pixels=True)
    (study_id,) = [
        s for s in cluster.orthanc.get("/studies")
        if cluster.orthanc.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]
        == source.StudyInstanceUID
    ]  # fmt: skip
    results = wait_for(lambda: len(cluster.orthanc.results(study_id)) == 2, 120, "results")
    assert results
    worker = cluster.url("worker1", "")
    assert httpx.get(worker + "/dicom-web/studies").status_code in (404, 405)  # no STOW
    assert httpx.get(worker + "/metrics", headers=auth).status_code == 200
    assert httpx.get(worker + "/readyz").json()["broker"] is True
    records = [j for j in cluster.records() if j.get("queue_seconds") is not None]
    assert records and all(0 <= j["queue_seconds"] < 300 for j in records)


def test_a_job_run_again_sends_the_same_objects(cluster, studies):
    """A job predicted again (as after a worker died between storing and acknowledging) makes
    the same SEG and SR: the PACS still holds one of each for the study."""
    source = pydicom.dcmread(studies[2][0], stop_before_pixels=True)
    from ctpipe.serve.telemetry import tag

    (record,) = [j for j in cluster.records() if j["series"] == tag(source.SeriesInstanceUID)]
    record.update(status="queued", send="waiting")
    path = cluster.folder / "spool" / "jobs" / record["id"] / "job.json"
    path.write_text(json.dumps(record))
    params = pika.URLParameters(cluster.broker.url.replace("guest@", "guest:guest@"))
    connection = pika.BlockingConnection(params)
    message = json.dumps({"kind": "serve", "job": record["id"]}).encode()
    connection.channel().basic_publish("", QUEUE, message, pika.BasicProperties(delivery_mode=2))
    connection.close()
    again = wait_for(
        lambda: (r := json.loads(path.read_text()))["runs"] == 2 and r["send"] == "sent" and r,
        120,
        "the job run and sent again",
    )
    assert again["status"] == "predicted"
    (study_id,) = [
        s for s in cluster.orthanc.get("/studies")
        if cluster.orthanc.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]
        == source.StudyInstanceUID
    ]  # fmt: skip
    results = cluster.orthanc.results(study_id)
    assert len(results["SEG"]) == 1 and len(results["SR"]) == 1, results


def test_two_receivers_on_one_spool_make_one_job_per_series(cluster, tmp_path, write_tiny_cohort):
    cluster.start("receiver2", "receiver")
    write_tiny_cohort(tmp_path / "s", n=1, seed=52)
    files = sorted((tmp_path / "s").rglob("*.dcm"))
    series = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    from ctpipe.serve.telemetry import tag

    study_id = cluster.orthanc.upload(files)
    for name in ("receiver", "receiver2"):  # the same instances to both
        cluster.orthanc.store(name, study_id)
    wait_for(lambda: len(cluster.orthanc.results(study_id)) == 2, 300, "results")
    jobs = [j for j in cluster.records() if j["series"] == tag(series)]
    assert len(jobs) == 1, jobs  # the loser of the race made none
    cluster.procs.pop("receiver2").terminate()


def test_garbage_and_hostile_messages_go_to_the_dead_letter_queue(cluster):
    params = pika.URLParameters(cluster.broker.url.replace("guest@", "guest:guest@"))
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    bodies = [
        b"not json {",
        json.dumps({"kind": "serve", "job": "../../etc/passwd"}).encode(),
        json.dumps({"kind": "serve", "job": "00000000000000000000-abcdef"}).encode(),  # no job
        json.dumps(
            {
                "kind": "predict",
                "archive": "/etc",
                "files": ["passwd"],
                "out": "/tmp/x",
                "series": "1.2.3",
            }
        ).encode(),  # fmt: skip
        json.dumps(
            {
                "kind": "predict",
                "archive": str(cluster.folder),
                "files": ["../../x"],
                "out": str(cluster.folder / "o"),
                "series": "1.2.3",
            }
        ).encode(),  # fmt: skip
        json.dumps({"kind": "send", "job": "00000000000000000000-abcdef"}).encode(),
    ]
    for i, body in enumerate(bodies):
        queue = f"{QUEUE}.send" if i == len(bodies) - 1 else QUEUE
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))

    def dead() -> int:
        return channel.queue_declare(
            f"{QUEUE}.dead", durable=True, passive=True
        ).method.message_count

    wait_for(lambda: dead() == len(bodies), 60, "every message dead-lettered")
    connection.close()
    for name in ("worker1", "worker2"):
        assert cluster.procs[name].poll() is None and cluster.ready(name)
    assert not (cluster.folder / "o").exists()


def test_readyz_follows_the_broker_and_workers_reconnect(cluster, studies):
    cluster.broker.stop()
    try:
        wait_for(lambda: not cluster.ready("worker1"), 60, "worker unready")
        body = httpx.get(cluster.url("worker1", "/readyz")).json()
        assert body["broker"] is False
    finally:
        cluster.broker.start()
    for name in ("worker1", "worker2"):
        wait_for(lambda n=name: cluster.ready(n), 120, f"{name} ready again")
    before = len(cluster.records())
    cluster.orthanc.store("receiver", cluster.orthanc.upload(studies[0]))  # again: a new job
    sent_jobs(cluster, before + 1)


def test_retrospective_run_through_the_queue_equals_local_predict(
    cluster, tmp_path_factory, write_tiny_cohort, density_package
):
    root = cluster.folder / "archive"  # under queue.shared_roots
    write_tiny_cohort(root, n=3, seed=61)
    outs = {"local": cluster.folder / "out-local", "queue": cluster.folder / "out-queue"}
    common = [sys.executable, "-m", "ctpipe.predict", "--package", str(density_package)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for how, out in outs.items():
        extra = ["--queue", cluster.broker.url, "--queue-name", QUEUE] if how == "queue" else []
        done = subprocess.run(
            [*common, *extra, str(root), str(out)], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    summaries = {k: json.loads((v / "summary.json").read_text()) for k, v in outs.items()}
    assert summaries["queue"] == summaries["local"]
    assert summaries["local"]["predicted"] == 3
    for uid in summaries["local"]["series"]:
        for name in ("nodules.csv", "mask.nii.gz"):
            local, queued = (outs[k] / uid / name for k in ("local", "queue"))
            assert local.read_bytes() == queued.read_bytes(), (uid, name)


def test_roles_need_a_broker_and_the_password_stays_out_of_the_config(tmp_path, tiny_package):
    raw = yaml.safe_load((ROOT / "serve.yaml").read_text())
    raw.update(package=str(tiny_package), spool_dir=str(tmp_path / "spool"))
    raw["http"]["tokens_file"] = str(tmp_path / "tokens.yaml")
    make_tokens(tmp_path)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = config.parse_args(["--config", str(path), "--role", "worker"])
    with pytest.raises(config.ConfigError, match="queue.kind: --role worker needs rabbitmq"):
        config.load(args)
    assert serve_main(["--config", str(path), "--role", "receiver"]) == 2
    raw["queue"] = {"kind": "rabbitmq", "url": "amqp://ctpipe:s3cret@127.0.0.1:5672/%2F",
                    "password_env": "CTPIPE_AMQP_PASSWORD"}  # fmt: skip
    with pytest.raises(config.ConfigError, match="queue: Value error, url carries a password"):
        config.parse(raw)
    raw["queue"]["url"] = "amqp://ctpipe@127.0.0.1:5672/%2F"
    raw["queue"]["password_env"] = "CTPIPE_TEST_UNSET_VARIABLE"
    with pytest.raises(config.ConfigError, match=r"CTPIPE_TEST_UNSET_VARIABLE is not set"):
        config.parse(raw)
    raw["queue"]["url"] = "amqp://guest@10.1.2.3:5672/%2F"
    raw["queue"]["password_env"] = None
    with pytest.raises(config.ConfigError, match="amqp:// beyond localhost"):
        config.parse(raw)
