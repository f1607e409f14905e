"""Build the container image of the node (``deploy/Containerfile``) with podman: ``make image``.

    python scripts/build_image.py [--package models/export] [--tag localhost/ctpipe:latest]

1. The Debian base (``localhost/ctpipe-debian-base:bookworm``) is made when podman has none: no
   image registry is needed, only the Debian mirror (``debootstrap --variant=minbase``), slimmed
   as Debian's ``-slim`` images are (no documentation, manual pages or translations).
2. The build context is staged in a temporary folder with exactly what the image copies: the
   ``ctpipe`` package, the deployment lock and the model package, so neither
   the venv, the data, the DVC cache nor a spool can reach the build.
3. The image carries the label ``org.ctpipe.inputs``, a hash of those inputs and of the base
   image; when the image under ``--tag`` already has the same hash, nothing is built (the tests'
   session fixture builds once per CI run this way).

Prints the tag. Exit status 0 when the image is there, 1 when a step failed.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/ctpipe:latest"
BASE = "localhost/ctpipe-debian-base:bookworm"
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
LABEL = "org.ctpipe.inputs"
# what the context holds: (source under ROOT, name in the context)
SOURCES = [
    ("ctpipe", "ctpipe"),
    ("deploy/requirements.txt", "deploy/requirements.txt"),
    ("deploy/Containerfile", "deploy/Containerfile"),
]
# dpkg leaves these out of every package installed later too (as Debian's -slim images do)
SLIM = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""

log = logging.getLogger("build_image")


class BuildError(RuntimeError):
    """A step of the build failed; the message names the step and its output's end."""


def run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr).strip().splitlines()[-20:]
        raise BuildError(f"{what} failed ({' '.join(cmd[:3])} ...):\n" + "\n".join(tail))
    return result


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def image_id(name: str) -> str:
    return run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", name], "inspect"
    ).stdout.strip()


def image_label(name: str, label: str) -> str | None:
    if not image_exists(name):
        return None
    fmt = '{{ index .Config.Labels "' + label + '" }}'
    value = run(["podman", "image", "inspect", "--format", fmt, name], "inspect").stdout.strip()
    return value if value and value != "<no value>" else None


def make_base(name: str = BASE) -> None:
    """A minimal Debian root file system from the mirror, imported as the image ``name``."""
    with tempfile.TemporaryDirectory(prefix="ctpipe-base-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        log.info("debootstrap %s into %s (a few minutes)", SUITE, root)
        run(["debootstrap", "--variant=minbase", SUITE, str(root), MIRROR], "debootstrap")
        (root / "etc/dpkg/dpkg.cfg.d/slim").write_text(SLIM)
        for pattern in ("usr/share/doc/*/*", "usr/share/man/*", "usr/share/info/*",
                        "usr/share/locale/*", "var/cache/apt/archives/*.deb",
                        "var/cache/apt/*.bin", "var/lib/apt/lists/*", "var/log/*.log"):  # fmt: skip
            for path in root.glob(pattern):
                if path.name != "copyright":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        run(["podman", "import", "-", name], "podman import", stdin=tar.stdout)
        if tar.wait() != 0:
            raise BuildError(f"tar of {root} failed")


def stage(context: Path, package: Path) -> None:
    """Copy the image's inputs into ``context``, readable by everyone (the image's user is not
    root) and without bytecode caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for source, name in SOURCES:
        src, dst = ROOT / source, context / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=ignore)
        else:
            shutil.copy2(src, dst)
    if not (package / "input_spec.json").is_file():
        raise BuildError(f"{package}: not a model package (no input_spec.json); make repro")
    shutil.copytree(package, context / "model-package", ignore=ignore)
    for folder, _dirs, files in os.walk(context):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def inputs_hash(context: Path, base_id: str) -> str:
    """sha256 over the base image's id and every staged file's path and content."""
    digest = hashlib.sha256(base_id.encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(context)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def ca_bundle() -> Path:
    """The CA bundle pip trusts on this machine (a TLS-intercepting proxy's CA included), handed
    to the build as a secret: the image's pip reaches PyPI through the same proxy."""
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        if os.environ.get(name) and Path(os.environ[name]).is_file():
            return Path(os.environ[name])
    return Path("/etc/ssl/certs/ca-certificates.crt")


def build(package: Path, tag: str = TAG, base: str = BASE) -> str:
    """The image ``tag`` built from this checkout with ``package`` baked in, unless an image of
    the same inputs is already there; returns ``tag``."""
    if shutil.which("podman") is None:
        raise BuildError("podman is missing: apt-get install -y podman runc debootstrap")
    if not image_exists(base):
        make_base(base)
    with tempfile.TemporaryDirectory(prefix="ctpipe-context-", dir="/var/tmp") as tmp:
        context = Path(tmp)
        stage(context, package)
        wanted = inputs_hash(context, image_id(base))
        if image_label(tag, LABEL) == wanted:
            log.info("%s is up to date (%s %s)", tag, LABEL, wanted[:12])
            return tag
        log.info("building %s (a few minutes the first time)", tag)
        previous = image_id(tag) if image_exists(tag) else None
        run(
            ["podman", "build", "--isolation", "chroot", "--format", "docker",
             "--build-arg", f"BASE={base}", "--build-arg", "PACKAGE=model-package",
             "--secret", f"id=cacert,src={ca_bundle()}",
             "--label", f"{LABEL}={wanted}", "-f", "deploy/Containerfile", "-t", tag, "."],
            "podman build", cwd=context,
        )  # fmt: skip
        if previous and previous != image_id(tag):  # untagged now: its disk space goes back
            subprocess.run(["podman", "rmi", previous], capture_output=True)  # in use: kept
    return tag


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, default=ROOT / "models/export")
    parser.add_argument("--tag", default=TAG)
    parser.add_argument("--base", default=BASE)
    args = parser.parse_args(argv)
    try:
        print(build(args.package.resolve(), args.tag, args.base))
    except BuildError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
