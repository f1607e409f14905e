"""``python -m ctpipe.serve [--config serve.yaml] [flags]``: the DICOM AI node (docs/serving.md)."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import uvicorn

from ctpipe.serve import config
from ctpipe.serve.dimse import StoreSCP
from ctpipe.serve.runner import Runner
from ctpipe.serve.spool import Spool
from ctpipe.serve.telemetry import Metrics
from ctpipe.serve.web import create_app

log = logging.getLogger("ctpipe.serve")


def model_version(package: Path, model: str) -> str:
    """Short hash of the served ONNX file: the label that says which model made a result."""
    name = "model.onnx" if model == "fp32" else "model_int8.onnx"
    path = package / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
    return f"{model}-{digest}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("predict", "ctpipe.dicomio", "pynetdicom"):  # they name series and files
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    try:
        cfg = config.load(config.parse_args(argv))
        token = config.token(cfg)
    except (config.ConfigError, OSError) as err:
        log.error("%s", err)
        return 2
    metrics = Metrics(model_version(Path(cfg["package"]), cfg["model"]))
    spool = Spool(
        Path(cfg["spool_dir"]),
        float(cfg["quiet_seconds"]),
        int(float(cfg.get("max_study_mb", 2048)) * (1 << 20)),
    )
    runner = Runner(spool, cfg, metrics)
    runner.start()
    scp = StoreSCP(cfg, spool, metrics)
    scp.start()
    http_port = int(cfg.get("http", {}).get("port", 8080))
    log.info(
        "serving %s: DICOM %s@%s:%s, HTTP %s:%s",
        metrics.version,
        cfg["dicom"]["ae_title"],
        cfg["host"],
        cfg["dicom"]["port"],
        cfg["host"],
        http_port,
    )
    try:
        uvicorn.run(
            create_app(cfg, spool, metrics, token),
            host=cfg["host"],
            port=http_port,
            log_level="warning",
            access_log=False,  # request lines could carry study UIDs
        )
    finally:
        scp.shutdown()
        runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
