"""The container image for the tests: built once per session by ``scripts/build_image.py`` (which
skips the build when the image's input hash label matches), and ``podman run`` command lines.

A test module uses the image through the session fixture::

    import imagekit

    ctpipe_image = imagekit.ctpipe_image  # the session fixture: the image's tag
    pytestmark = imagekit.SKIP  # skipped, with the install command, where podman cannot run
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# one tag per checkout: two work trees on one machine would otherwise rebuild it for each other
TAG = f"localhost/ctpipe:test-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"
USER_ID = 10001  # the image's user (deploy/Containerfile); mounted files must be readable by it
INSTALL = (
    "apt-get install -y podman runc debootstrap, as root, and `default_ulimits = []` under "
    "[containers] in /etc/containers/containers.conf (.ci/run does)"
)


def missing() -> str | None:
    """Why the container tests cannot run here, or None."""
    tools = [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]
    if tools:
        return f"needs {', '.join(tools)}: {INSTALL}"
    if os.geteuid() != 0:
        return f"needs root (rootful podman with runc): {INSTALL}"
    return None


SKIP = pytest.mark.skipif(missing() is not None, reason=missing() or "")


def podman(*args: str) -> list[str]:
    """A podman command line with the runtime that works on this project's machines."""
    return ["podman", "--runtime", "runc", *args]


def build(package: Path, tag: str = TAG, log: Path | None = None) -> str:
    """``scripts/build_image.py`` with ``package`` baked in; its output goes to ``log``."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_image.py"), "--package", str(package),
         "--tag", tag],
        stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    if result.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise AssertionError(f"building {tag} failed:\n{tail}")
    return tag


@pytest.fixture(scope="session")
def ctpipe_image(tmp_path_factory, density_package) -> str:
    """The image tag, built once per session with the density package (never empty predictions)
    baked in at /opt/ctpipe/models/export; reused while its inputs are unchanged."""
    log = tmp_path_factory.mktemp("image") / "build.log"
    return build(density_package, TAG, log)
