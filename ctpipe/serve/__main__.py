"""``python -m ctpipe.serve [--config serve.yaml] [flags]``: the DICOM AI node (docs/serving.md)."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import sys
import warnings
from pathlib import Path

import uvicorn

from ctpipe.serve import config, logs
from ctpipe.serve import tokens as tokens_file
from ctpipe.serve.audit import Audit
from ctpipe.serve.dimse import StoreSCP
from ctpipe.serve.roles import ReceiverRunner, WorkerRunner
from ctpipe.serve.runner import Runner
from ctpipe.serve.spool import Spool, SpoolError
from ctpipe.serve.telemetry import Metrics
from ctpipe.serve.web import create_app

log = logging.getLogger("ctpipe.serve")


def model_version(package: Path, model: str) -> str:
    """Short hash of the served ONNX file: the label that says which model made a result."""
    name = "model.onnx" if model == "fp32" else "model_int8.onnx"
    path = package / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
    return f"{model}-{digest}"


def quiet_third_parties() -> None:
    """Libraries that name series, files or header values in their messages are silenced:
    the node's own log lines say what happened, without PHI."""
    for noisy in ("predict", "ctpipe.dicomio", "pynetdicom", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")  # pydicom's warnings quote the values they warn about
    # and so do the interpreters that multiprocessing starts (predict processes, its resource
    # tracker, whose shutdown warnings would be lines outside the node's log format)
    sys.warnoptions.append("ignore")
    logging.getLogger("pika").setLevel(logging.WARNING)  # a line per connection step otherwise


def main(argv: list[str] | None = None) -> int:
    args = config.parse_args(argv)
    role = getattr(args, "role", "all")  # which part of the node this process runs
    logs.setup(args.log_format or "text", role)  # the flag already applies to a config error
    quiet_third_parties()
    os.umask(0o077)  # everything the node writes is owner-only
    try:
        cfg = config.load(args)
        logs.setup(cfg.log_format, role)
        tokens = tokens_file.load(cfg.http.tokens_file)
        spool = Spool(
            cfg.spool_dir,
            cfg.quiet_seconds,
            int(cfg.limits.max_study_mb * (1 << 20)),
            int(cfg.limits.min_free_disk_mb * (1 << 20)),
        )
        audit = Audit(cfg.audit_path)
    except (config.ConfigError, tokens_file.TokenError, SpoolError, OSError) as err:
        log.error("%s", err)
        return 2
    role = args.role
    metrics = Metrics(model_version(cfg.package, cfg.model))
    runner = {"all": Runner, "receiver": ReceiverRunner, "worker": WorkerRunner}[role](
        spool, cfg, metrics, audit
    )
    runner.start()
    scp = StoreSCP(cfg, spool, metrics, audit) if role != "worker" else None
    if scp is not None:
        scp.start()
    tls = cfg.http.tls
    audit(
        "start",
        "started",
        role=role,
        model_version=metrics.version,
        tls_dicom=bool(cfg.dicom.tls),
        tls_http=bool(tls),
    )
    log.info(
        "serving %s as %s: DICOM%s %s@%s:%s, HTTP%s %s:%s",
        metrics.version,
        role,
        " (TLS)" if cfg.dicom.tls else "",
        cfg.dicom.ae_title,
        cfg.host,
        scp.port if scp is not None else "(none: a worker)",
        "S" if tls else "",
        cfg.host,
        cfg.http.port,
    )
    broker = (lambda: runner.broker_connected) if role != "all" else None
    try:
        uvicorn.run(
            create_app(cfg, spool, metrics, tokens, audit, role, broker),
            host=cfg.host,
            port=cfg.http.port,
            log_level="warning",
            log_config=None,  # uvicorn's records go through the node's handler and format
            access_log=False,  # request lines could carry study UIDs; the audit log has requests
            limit_concurrency=cfg.limits.max_requests,
            ssl_certfile=tls.cert if tls else None,
            ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=tls.ca if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.require_client_cert else ssl.CERT_NONE,
        )
    finally:
        if scp is not None:
            scp.shutdown()
        runner.shutdown()
        audit.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
