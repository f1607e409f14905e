"""The node's log formats: JSON lines with the fields a collector needs, the job of a record,
exceptions without the values they carry, and the config key and flag that choose the format.
(tests/test_alerts.py reads the JSON log of a running node.)"""

from __future__ import annotations

import io
import json
import logging

import pytest
import yaml

from ctpipe.serve import config, logs

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"


def emit(formatter: logging.Formatter, *args, exc: Exception | None = None, **extra) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("ctpipe.test_serve_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        if exc is None:
            logger.warning(*args, extra=extra or None)
        else:
            try:
                raise exc
            except Exception:  # noqa: BLE001 - logged with its traceback on purpose
                logger.exception(*args)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_line_has_time_level_logger_role_job_event():
    line = emit(
        logs.JsonFormatter(role="worker"), "job %s: send %s (%s)", "0001-ab", "retrying", "x"
    )
    assert line.count("\n") == 1
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "ctpipe.test_serve_logs"
    assert entry["role"] == "worker" and entry["job"] == "0001-ab"
    assert entry["event"] == "job 0001-ab: send retrying (x)"
    assert entry["time"].endswith("Z") and "T" in entry["time"]


def test_job_from_extra_and_none_for_other_records():
    with_extra = json.loads(emit(logs.JsonFormatter(), "results of %s", "A", job="0002-cd"))
    assert with_extra["job"] == "0002-cd"
    other = json.loads(emit(logs.JsonFormatter(), "association refused: %s", "no such AE"))
    assert "job" not in other and other["role"] == "all"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_exceptions_show_type_and_frames_but_no_uid_or_source(fmt):
    formatter = logs.JsonFormatter() if fmt == "json" else logs.TextFormatter(logs.TEXT)
    secret_line = "raise exc"  # the source line of the raise: tracebacks usually quote it
    out = emit(formatter, "loop failed about %s", UID, exc=ValueError(f"bad series {UID}"))
    assert UID not in out and "uid:" in out
    assert "ValueError: bad series uid:" in out
    assert "test_serve_logs.py" in out and secret_line not in out
    if fmt == "json":
        assert "error" in json.loads(out)


def test_log_format_from_the_config_and_the_flag(tmp_path):
    raw = {
        "package": str(tmp_path),
        "model": "fp32",
        "spool_dir": str(tmp_path / "spool"),
        "workers": 1,
        "quiet_seconds": 1,
        "dicom": {"ae_title": "CTPIPE", "port": 0, "allowed_callers": [{"ae_title": "PACS"}]},
        "http": {"port": 0, "tokens_file": str(tmp_path / "tokens.yaml")},
    }
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert config.load(config.parse_args(["--config", str(path)])).log_format == "text"
    flagged = config.parse_args(["--config", str(path), "--log-format", "json"])
    assert config.load(flagged).log_format == "json"
    path.write_text(yaml.safe_dump({**raw, "log_format": "xml"}))
    with pytest.raises(config.ConfigError, match="log_format"):
        config.load(config.parse_args(["--config", str(path)]))
