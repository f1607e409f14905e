"""Load on the DICOM node: N studies sent at once to ``python -m ctpipe.serve`` (half over
C-STORE, half over STOW-RS), against the alternative a user would script: ``python -m
ctpipe.predict`` on each study folder, one after the other. Localhost only, bounded in count and
time.

Prints, for the node: studies per minute (first instance sent -> last result stored), the time
from a study's last instance acknowledged to its SEG and SR stored at the destination (p50/p95,
with and without the quiet period), failures (refused instances, jobs not predicted, results
missing: must be 0) and the server's peak resident memory; for the folder loop: studies per
minute and peak memory. Writes ``metrics/bench_serve.json``; the serve spool's job records are
the input of ``python -m ctpipe.monitor`` (issue 18).

    python benchmarks/bench_serve.py [--studies 20] [--package models/export] [--senders 4]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pydicom
import yaml
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage

from ctpipe import config, synth
from ctpipe.fileio import write_json
from ctpipe.serve import tokens
from ctpipe.serve.send import multipart_related

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Destination:
    """The PACS the results go to: records when each study's SEG and SR arrived."""

    def __init__(self) -> None:
        self.port, self.arrived, self.lock = free_port(), {}, threading.Lock()
        ae = AE(ae_title="DEST")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.store)]
        )

    def store(self, event) -> int:
        ds = event.dataset
        with self.lock:
            self.arrived.setdefault(str(ds.StudyInstanceUID), {})[str(ds.Modality)] = time.time()
        return 0x0000

    def done(self, study: str) -> float | None:
        kinds = self.arrived.get(study, {})
        return max(kinds.values()) if {"SEG", "SR"} <= set(kinds) else None


# --shift: a scanner change the drift monitor should see (thin slices, an offset, another kernel)
SHIFT = {"slice_spacing_mm": (1.25,), "hu_offset": 40.0, "kernel": "B70f"}


def write_studies(out: Path, n: int, shift: bool, seed: int = 900) -> list[tuple[str, list[Path]]]:
    """``n`` studies of the default cohort (``seed``), as (Study Instance UID, files)."""
    cfg = synth.Cohort.from_params(config.load(ROOT / "params.yaml").ingest.synthetic)
    cfg = cfg.but(**SHIFT) if shift else cfg
    studies = []
    for i in range(n):
        synth.write_case(out, seed, i, cfg)
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        files = sorted(folder.rglob("*.dcm"))
        studies.append(
            (str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files)
        )
    return studies


def send_dimse(port: int, files: list[Path], token: str = "") -> int:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CTPIPE")
    if not assoc.is_established:
        return len(files)
    failures = sum(assoc.send_c_store(pydicom.dcmread(p)).Status != 0 for p in files)
    assoc.release()
    return failures


def send_stow(port: int, files: list[Path], token: str) -> int:
    body, content_type = multipart_related([p.read_bytes() for p in files])
    response = httpx.post(
        f"http://127.0.0.1:{port}/dicom-web/studies",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
        timeout=300,
    )
    if response.status_code == 200:
        return 0
    return (
        len(response.json().get("00081198", {}).get("Value", files))
        if response.content
        else len(files)
    )


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    """The node's child processes (one predict process per worker)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def start_node(args, tmp: Path, dest_port: int | None) -> tuple[subprocess.Popen, int, int, str]:
    """``python -m ctpipe.serve`` on free ports with a token of its own; (process, DICOM port,
    HTTP port, token) once it is ready."""
    cfg = yaml.safe_load((ROOT / "serve.yaml").read_text())
    dicom_port, http_port = free_port(), free_port()
    token = tokens.add(tmp / "tokens.yaml", "bench", ["store", "read", "metrics"])
    cfg.update(
        package=str(args.package),
        model=args.model,
        spool_dir=str(tmp / "spool"),
        workers=args.workers,
    )
    cfg["dicom"].update(
        port=dicom_port, allowed_callers=[{"ae_title": "PACS", "host": "127.0.0.1"}]
    )
    cfg["http"].update(port=http_port, tokens_file=str(tmp / "tokens.yaml"))
    if dest_port is not None:
        cfg["destination"] = {
            "kind": "dicom",
            "ae_title": "DEST",
            "host": "127.0.0.1",
            "port": dest_port,
        }
    (tmp / "serve.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctpipe.serve", "--config", str(tmp / "serve.yaml")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=open(tmp / "serve.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    return proc, dicom_port, http_port, token


def run_node(args, tmp: Path, studies) -> dict:
    dest = Destination()
    proc, dicom_port, http_port, token = start_node(args, tmp, dest.port)
    try:
        start, sent_at, failures = time.time(), {}, 0

        def send(item):
            index, (study, files) = item
            sender = send_dimse if index % 2 == 0 else send_stow
            bad = sender(dicom_port if index % 2 == 0 else http_port, files, token)
            sent_at[study] = time.time()
            return bad

        with ThreadPoolExecutor(args.senders) as pool:
            failures += sum(pool.map(send, enumerate(studies)))
        deadline = time.time() + args.timeout
        while time.time() < deadline and not all(dest.done(s) for s, _ in studies):
            time.sleep(0.5)
        done = {s: dest.done(s) for s, _ in studies}
        failures += sum(t is None for t in done.values())
        latency = np.array([done[s] - sent_at[s] for s in done if done[s]])
        end = max((t for t in done.values() if t), default=time.time())
        return {
            "studies": len(studies),
            "failures": int(failures),
            "studies_per_min": round(60 * len(latency) / (end - start), 2),
            "latency_p50_s": round(float(np.percentile(latency, 50)), 1) if len(latency) else None,
            "latency_p95_s": round(float(np.percentile(latency, 95)), 1) if len(latency) else None,
            "peak_rss_mb": round(peak_rss_mb(proc.pid), 0),
            "predict_process_peak_rss_mb": max(
                (round(peak_rss_mb(c), 0) for c in children(proc.pid)), default=None
            ),
            "wall_s": round(end - start, 1),
        }
    finally:
        proc.terminate()
        proc.wait(30)
        dest.server.shutdown()


def run_stow_memory(args, tmp: Path, source: Path) -> dict:
    """One STOW-RS request of ``--stow-mb`` MB (copies of one slice, each with a SOP Instance UID
    of its own), streamed to a fresh node: how much its peak resident memory rises."""
    proc, _, http_port, token = start_node(args, tmp, None)
    try:
        ds = pydicom.dcmread(source)
        one = len(source.read_bytes())
        count = max(1, int(args.stow_mb * (1 << 20) / one))
        boundary = os.urandom(16).hex()

        def body():
            for i in range(count):
                ds.SOPInstanceUID = f"2.25.{i + 1}"
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
                yield head.encode() + buffer.getvalue() + b"\r\n"
            yield f"--{boundary}--\r\n".encode()

        before = peak_rss_mb(proc.pid)
        start = time.time()
        response = httpx.post(
            f"http://127.0.0.1:{http_port}/dicom-web/studies",
            content=body(),
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            },
            timeout=600,
        )
        after = peak_rss_mb(proc.pid)
        stored = len(response.json().get("00081199", {}).get("Value", []))
        return {
            "request_mb": round(count * one / (1 << 20), 0),
            "instances": count,
            "stored": stored,
            "status": response.status_code,
            "seconds": round(time.time() - start, 1),
            "peak_rss_before_mb": round(before, 0),
            "peak_rss_after_mb": round(after, 0),
            "peak_rss_rise_mb": round(after - before, 0),
        }
    finally:
        proc.terminate()
        proc.wait(30)


def run_folder_loop(args, tmp: Path, studies) -> dict:
    start = time.time()
    for i, (_, files) in enumerate(studies):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ctpipe.predict",
                str(files[0].parent),
                str(tmp / f"out{i}"),
                "--package",
                str(args.package),
                "--model",
                args.model,
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    wall = time.time() - start
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "studies": len(studies),
        "studies_per_min": round(60 * len(studies) / wall, 2),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(child, 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--package", type=Path, default=ROOT / "models" / "export")
    parser.add_argument("--model", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--senders", type=int, default=4, help="studies sent at the same time")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for results")
    parser.add_argument("--no-baseline", action="store_true", help="skip the predict folder loop")
    parser.add_argument("--shift", action="store_true", help=f"studies shifted by {SHIFT}")
    parser.add_argument("--records", type=Path, help="copy serve's series records here")
    parser.add_argument(
        "--stow-mb",
        type=float,
        default=500,
        help="size of the one-request STOW-RS memory test (0: off)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        studies = write_studies(tmp / "studies", args.studies, args.shift)
        print(f"{len(studies)} studies of {len(studies[0][1])} slices ({args.model})", flush=True)
        # The loop first: its peak memory is read from the finished children, before serve's.
        loop = None if args.no_baseline else run_folder_loop(args, tmp, studies)
        if loop:
            print(f"predict folder loop: {loop}", flush=True)
        node = run_node(args, tmp, studies)
        print(f"ctpipe.serve: {node}", flush=True)
        stow = None
        if args.stow_mb > 0:
            stow = run_stow_memory(args, tmp / "stow", studies[0][1][0])
            print(f"one STOW-RS request: {stow}", flush=True)
        if args.records:  # the series records serve wrote: python -m ctpipe.monitor's input
            shutil.copytree(tmp / "spool" / "records", args.records, dirs_exist_ok=True)
    result = {
        "node": node,
        "predict_folder_loop": loop,
        "stow_memory": stow,
        "model": args.model,
        "cpus": os.cpu_count(),
    }
    name = "bench_serve_shifted.json" if args.shift else "bench_serve.json"
    write_json(ROOT / "metrics" / name, {**result, "shift": SHIFT if args.shift else None})
    print(f"{'':22}{'studies/min':>12}{'p50 s':>8}{'p95 s':>8}{'peak MB':>9}{'failures':>9}")
    print(
        f"{'serve (C-STORE+STOW)':22}{node['studies_per_min']:>12}{node['latency_p50_s']!s:>8}"
        f"{node['latency_p95_s']!s:>8}{node['peak_rss_mb']:>9}{node['failures']:>9}"
    )
    if loop:
        print(
            f"{'predict folder loop':22}{loop['studies_per_min']:>12}{'':>8}{'':>8}"
            f"{loop['peak_rss_mb']:>9}"
        )
    if stow:
        print(
            f"one STOW-RS request of {stow['request_mb']:.0f} MB: node peak RSS "
            f"{stow['peak_rss_before_mb']:.0f} -> {stow['peak_rss_after_mb']:.0f} MB "
            f"(+{stow['peak_rss_rise_mb']:.0f}), {stow['stored']}/{stow['instances']} stored"
        )


if __name__ == "__main__":
    main()
