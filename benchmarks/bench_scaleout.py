"""Scale-out of the DICOM node: the one-process node (``--role all``, 1 worker, pinned to one core
with ``taskset``) against the RabbitMQ roles (a receiver and 1 or 2 workers, each worker pinned to
a core of its own), N studies sent by C-STORE at once (4 senders); then the kill test: a worker
SIGKILLed in the middle of M studies. Localhost only; the broker is Debian's rabbitmq-server
started as a plain process (tests/brokerkit.py; ``apt-get install -y rabbitmq-server``).

Prints per configuration: studies/min (first instance sent -> last result stored), p50/p95 latency
(a study's last instance acknowledged -> its SEG and SR at the destination), failures (instances
refused, studies without results: must be 0) and the queue wait of the jobs (publish -> deliver,
measured by the workers); the broker's own overhead per message (publish with confirm -> deliver,
one message at a time on an idle queue); for the kill test: lost studies, duplicated ones (series
with more than one distinct SEG or SR SOP Instance UID at the destination, which a PACS would keep
as two objects) and seconds from the kill to the redelivered job's results. Writes
``metrics/bench_scaleout.json``.

    python benchmarks/bench_scaleout.py [--studies 8] [--kill-studies 20]
        [--package models/export] [--workdir DIR] [--out metrics/bench_scaleout.json] [--no-kill]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pika
import yaml
from pynetdicom import AE, AllStoragePresentationContexts, evt

from ctpipe.fileio import write_json
from ctpipe.serve import tokens
from ctpipe.serve.telemetry import tag

ROOT = Path(__file__).resolve().parents[1]
CORES = sorted(os.sched_getaffinity(0))


def load(path: Path):
    """A module of this repository that is not on the import path, from its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def brokerkit():
    """tests/brokerkit.py: the plain-process broker the tests use."""
    return load(ROOT / "tests" / "brokerkit.py")


# The studies and the C-STORE sender of bench_serve.py (studies of another seed here).
SERVE = load(ROOT / "benchmarks" / "bench_serve.py")


class Destination:
    """The PACS stand-in: the distinct SEG and SR SOP Instance UIDs of each study, and when the
    study had both."""

    def __init__(self, port: int) -> None:
        self.port, self.lock = port, threading.Lock()
        self.uids: dict[str, dict[str, set]] = {}
        self.done_at: dict[str, float] = {}
        ae = AE(ae_title="DEST")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.store)]
        )

    def store(self, event) -> int:
        ds = event.dataset
        study = str(ds.StudyInstanceUID)
        with self.lock:
            kinds = self.uids.setdefault(study, {})
            kinds.setdefault(str(ds.Modality), set()).add(str(ds.SOPInstanceUID))
            if {"SEG", "SR"} <= set(kinds):
                self.done_at.setdefault(study, time.time())
        return 0x0000

    def duplicated(self) -> int:
        return sum(any(len(v) > 1 for v in kinds.values()) for kinds in self.uids.values())


class Node:
    """A node as processes: ``--role all`` alone, or a receiver and ``workers`` workers."""

    def __init__(self, args, folder: Path, broker_url: str, workers: int | None) -> None:
        self.folder, self.procs = folder, []
        folder.mkdir(parents=True)
        self.free = brokerkit().free_port
        self.dicom_port = self.free()
        tokens.add(folder / "tokens.yaml", "bench", ["read"])
        cfg = yaml.safe_load((ROOT / "serve.yaml").read_text())
        cfg.update(package=str(args.package), model="fp32", spool_dir=str(folder / "spool"),
                   workers=1, quiet_seconds=2)  # fmt: skip
        cfg["monitor"]["reference"] = None
        cfg["dicom"].update(allowed_callers=[{"ae_title": "PACS", "host": "127.0.0.1"}])
        cfg["http"]["tokens_file"] = str(folder / "tokens.yaml")
        cfg["destination"] = {"kind": "dicom", "ae_title": "DEST", "host": "127.0.0.1",
                              "port": args.dest_port}  # fmt: skip
        if workers is not None:
            cfg["queue"] = {"kind": "rabbitmq", "url": broker_url, "name": f"bench.{folder.name}"}
        (folder / "serve.yaml").write_text(yaml.safe_dump(cfg))
        if workers is None:
            self.start("all", CORES[0])
        else:
            self.start("receiver", None)
            self.workers = [self.start("worker", CORES[i % len(CORES)]) for i in range(workers)]

    def start(self, role: str, core: int | None) -> subprocess.Popen:
        http = self.free()
        command = [sys.executable, "-m", "ctpipe.serve", "--config", str(self.folder / "serve.yaml"),
                   "--role", role, "--http-port", str(http), "--dicom-port", str(self.dicom_port)]  # fmt: skip
        if core is not None:
            command = ["taskset", "-c", str(core), *command]
        proc = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=open(self.folder / f"{role}-{len(self.procs)}.log", "wb"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs.append(proc)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{http}/readyz").status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{role} not ready: {self.folder}")

    def records(self) -> list[dict]:
        found = []
        for path in (self.folder / "spool" / "jobs").glob("*/job.json"):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # being replaced
                pass
        return found

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def run(args, node: Node, dest: Destination, studies, kill: bool = False) -> dict:
    """Send every study at once (4 senders); wait for the results; the figures."""
    start, sent_at, failures, killed = time.time(), {}, 0, {}

    def send(item):
        study, files = item
        bad = SERVE.send_dimse(node.dicom_port, files)
        sent_at[study] = time.time()
        return bad

    with ThreadPoolExecutor(4) as pool:
        pending = pool.map(send, studies)
        if kill:
            killed = kill_in_the_middle(node, dest, len(studies))
        failures += sum(pending)
    deadline = time.time() + args.timeout
    while time.time() < deadline and len(dest.done_at) < len(studies):
        time.sleep(0.3)
    done = {s: dest.done_at.get(s) for s, _ in studies}
    lost = sum(t is None for t in done.values())
    latency = np.array([done[s] - sent_at[s] for s in done if done[s]])
    end = max((t for t in done.values() if t), default=time.time())
    waits = [r["queue_seconds"] for r in node.records() if r.get("queue_seconds") is not None]
    out = {
        "studies": len(studies),
        "studies_per_min": round(60 * (len(studies) - lost) / (end - start), 2),
        "latency_p50_s": round(float(np.percentile(latency, 50)), 2) if len(latency) else None,
        "latency_p95_s": round(float(np.percentile(latency, 95)), 2) if len(latency) else None,
        "failures": failures + lost,
        "queue_wait_p50_s": round(float(np.median(waits)), 3) if waits else None,
        "lost": lost,
        "duplicated": dest.duplicated(),
    }
    if killed:
        record = next(r for r in node.records() if r["id"] == killed["job"])
        out["killed_job_runs"] = record.get("runs")
        study = next((s for s, _ in studies if tag(s) == record["study"]), None)
        arrived = dest.done_at.get(study)
        out["redelivery_s"] = round(arrived - killed["at"], 2) if arrived else None
    return out


def kill_in_the_middle(node: Node, dest: Destination, n: int) -> dict:
    """SIGKILL the worker of a running job once about half the studies have their results."""
    deadline = time.time() + 600
    while time.time() < deadline and len(dest.done_at) < n:
        running = [r for r in node.records() if r["status"] == "running" and r.get("worker")]
        if len(dest.done_at) >= n // 2 and running:
            pid = int(running[0]["worker"].rsplit(":", 1)[1])
            if pid in {p.pid for p in node.workers}:
                os.kill(pid, signal.SIGKILL)
                return {"job": running[0]["id"], "at": time.time(), "pid": pid}
        time.sleep(0.1)
    return {}


def broker_overhead(url: str, n: int = 200) -> dict:
    """Publish (persistent, confirmed) -> deliver, one message at a time on an idle queue."""
    params = pika.URLParameters(url.replace("guest@", "guest:guest@"))
    queue, got, seconds = "bench.overhead", threading.Event(), []
    publisher = pika.BlockingConnection(params)
    channel = publisher.channel()
    channel.queue_declare(queue, durable=True)
    channel.queue_purge(queue)
    channel.confirm_delivery()

    def consume() -> None:
        connection = pika.BlockingConnection(params)
        ch = connection.channel()
        for _, _, body in ch.consume(queue, auto_ack=True):
            seconds.append(time.perf_counter() - json.loads(body)["t"])
            got.set()
            if len(seconds) == n:
                break
        ch.cancel()
        connection.close()

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.5)
    for _ in range(n):
        got.clear()
        body = json.dumps({"t": time.perf_counter()}).encode()
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
        got.wait(10)
    thread.join(30)
    channel.queue_delete(queue)
    publisher.close()
    ms = np.array(seconds) * 1000
    return {"messages": n, "p50_ms": round(float(np.median(ms)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2)}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8, help="studies per configuration")
    parser.add_argument("--kill-studies", type=int, default=20, help="studies of the kill test")
    parser.add_argument("--package", type=Path, default=ROOT / "models" / "export")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_scaleout.json")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for results")
    parser.add_argument("--no-kill", action="store_true", help="skip the kill test")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    kit = brokerkit()
    if not kit.available() or shutil.which("taskset") is None:
        print(f"needs rabbitmq-server and taskset: {kit.INSTALL} util-linux")
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="bench_scaleout.", dir=args.workdir))
    broker = kit.Broker(scratch / "broker").start()
    figures = {"cores": len(CORES), "overhead": broker_overhead(broker.url), "runs": {}}
    plan = [("one process", None, args.studies), ("roles, 1 worker", 1, args.studies),
            ("roles, 2 workers", 2, args.studies)]  # fmt: skip
    if not args.no_kill:
        plan.append(("kill test, 2 workers", 2, args.kill_studies))
    try:
        for i, (name, workers, n) in enumerate(plan):
            studies = SERVE.write_studies(scratch / f"studies{i}", n, shift=False, seed=950)
            args.dest_port = kit.free_port()
            dest = Destination(args.dest_port)
            node = Node(args, scratch / f"node{i}", broker.url, workers)
            try:
                figures["runs"][name] = run(args, node, dest, studies, kill=name.startswith("kill"))
            finally:
                node.stop()
                dest.server.shutdown()
            print(name, figures["runs"][name], flush=True)
    finally:
        broker.close()
        shutil.rmtree(scratch, ignore_errors=True)
    report(figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, figures)
    return 0


def report(figures: dict) -> None:
    over = figures["overhead"]
    print(f"\nbroker overhead per message (publish+confirm -> deliver, idle): "
          f"p50 {over['p50_ms']} ms, p95 {over['p95_ms']} ms ({over['messages']} messages)")  # fmt: skip
    columns = ("studies", "studies_per_min", "latency_p50_s", "latency_p95_s", "failures",
               "queue_wait_p50_s", "lost", "duplicated", "redelivery_s")  # fmt: skip
    print(f"{'configuration':24}" + "".join(f"{c:>18}" for c in columns))
    for name, run_ in figures["runs"].items():
        print(f"{name:24}" + "".join(f"{str(run_.get(c, '-')):>18}" for c in columns))


if __name__ == "__main__":
    sys.exit(main())
