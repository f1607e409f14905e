"""The container image of the node (deploy/Containerfile) beside the alternative, the node started
from the host's venv: the image's size against the venv's, and the time from start to ``/readyz``
200 of each (a container run with ``--network host`` against ``python -m ctpipe.serve``).

Builds the image first when it is missing or stale (scripts/build_image.py, ``make image``).
Needs podman, runc and root; localhost only.

    python benchmarks/bench_container.py [--repeat 3] [--package models/export] [--no-build]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import yaml

from ctpipe.serve import tokens

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/ctpipe:latest"
USER_ID = 10001  # the image's user


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_mb(path: Path) -> float:
    """Bytes of the files under ``path`` (links not followed), in MB."""
    total = sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return total / 1e6


def image_mb(tag: str) -> float:
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Size}}", tag],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(out.strip()) / 1e6


def write_config(folder: Path, package: str, spool: str, tokens_file: str) -> tuple[Path, int]:
    """A node config on free ports without a destination; returns its path and HTTP port."""
    cfg = yaml.safe_load((ROOT / "serve.yaml").read_text())
    http = free_port()
    cfg.update(package=package, spool_dir=spool, monitor={"reference": None})
    cfg["dicom"]["port"] = free_port()
    cfg["http"].update(port=http, tokens_file=tokens_file)
    cfg["destination"] = {"kind": "none"}
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, http


def until_ready(port: int, limit: float = 120) -> float:
    """Seconds until ``/readyz`` answers 200."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"/readyz on port {port} not 200 within {limit} s")


def start_host(tmp: Path, package: Path) -> float:
    """``python -m ctpipe.serve`` from this venv: seconds from the start to /readyz 200."""
    folder = tmp / f"host-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    tokens.add(folder / "tokens.yaml", "bench", ["read"])
    spool = str(folder / "spool")
    config, port = write_config(folder, str(package), spool, str(folder / "tokens.yaml"))
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctpipe.serve", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        until_ready(port)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(30)


def start_container(tmp: Path, tag: str) -> float:
    """The image with a mounted config and a fresh spool volume: seconds from ``podman run`` to
    /readyz 200."""
    etc = tmp / f"etc-{uuid.uuid4().hex[:6]}"
    etc.mkdir()
    tokens.add(etc / "tokens.yaml", "bench", ["read"])
    _, port = write_config(etc, "models/export", "/var/lib/ctpipe/spool", "/etc/ctpipe/tokens.yaml")
    for path in [etc, *etc.iterdir()]:
        os.chown(path, USER_ID, USER_ID)
    name = f"ctpipe-bench-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    subprocess.run(
        ["podman", "--runtime", "runc", "run", "-d", "--name", name, "--network", "host",
         "-v", f"{etc}:/etc/ctpipe:ro", "-v", f"{name}:/var/lib/ctpipe/spool", tag],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        until_ready(port)
        return time.perf_counter() - start
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "10", name], capture_output=True)
        subprocess.run(["podman", "volume", "rm", "-f", name], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="start-ups of each kind")
    parser.add_argument("--package", type=Path, default=ROOT / "models" / "export")
    parser.add_argument("--tag", default=TAG)
    parser.add_argument("--no-build", action="store_true", help="use the image as it is")
    args = parser.parse_args(argv)
    if shutil.which("podman") is None or os.geteuid() != 0:
        sys.exit("needs podman and root: apt-get install -y podman runc debootstrap")
    if not args.no_build:
        build = [sys.executable, str(ROOT / "scripts" / "build_image.py")]
        subprocess.run(build + ["--package", str(args.package), "--tag", args.tag], check=True)
    venv = Path(sys.prefix)
    print(f"image {args.tag}: {image_mb(args.tag):.0f} MB (uncompressed, base included)")
    print(f"host venv {venv}: {folder_mb(venv):.0f} MB (PyTorch and the training stack included)")
    with tempfile.TemporaryDirectory(prefix="bench-container-") as tmp:
        os.chmod(tmp, 0o755)  # the image's user reaches its mounted config
        runs = {"container": [], "host venv": []}
        for _ in range(args.repeat):  # interleaved: a slow moment hits both
            runs["container"].append(start_container(Path(tmp), args.tag))
            runs["host venv"].append(start_host(Path(tmp), args.package.resolve()))
    for kind, seconds in runs.items():
        figures = ", ".join(f"{s:.2f}" for s in seconds)
        print(
            f"start -> /readyz 200, {kind}: median {statistics.median(seconds):.2f} s ({figures})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
