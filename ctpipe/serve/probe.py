"""``python -m ctpipe.serve.probe [--config serve.yaml] [--path /healthz]``: ask the node on this
machine whether it is alive (the container image's ``HEALTHCHECK``; no curl in the image).

The port and scheme come from the same config the node reads, so the probe follows a changed
``http.port`` or ``http.tls`` without a change to the image. Exit status 0 on HTTP 200, 1 otherwise.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ctpipe.serve import config


def probe_url(cfg: config.ServeConfig, path: str) -> str:
    """The URL of ``path`` on this node as seen from the same machine."""
    # a wildcard bind address is reached on loopback; an explicit one as it is
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(cfg.host, cfg.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if cfg.http.tls else "http"
    return f"{scheme}://{host}:{cfg.http.port}{path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctpipe.serve.probe", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("serve.yaml"))
    parser.add_argument("--path", default="/healthz", choices=["/healthz", "/readyz"])
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        cfg = config.load(config.parse_args(["--config", str(args.config)]))
    except config.ConfigError as err:
        print(f"probe: {err}", file=sys.stderr)
        return 1
    # The probe talks to its own node over loopback: the certificate names the public host
    # name, not 127.0.0.1, so it is not verified here (clients outside verify it).
    context = ssl._create_unverified_context() if cfg.http.tls else None  # noqa: S323
    url = probe_url(cfg, args.path)
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as err:
        print(f"probe: {url}: {err}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
