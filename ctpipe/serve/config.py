"""The server's configuration: one YAML file (``serve.yaml``), flags that override it, and the
bearer token from the environment (or a file outside git), never from the file itself."""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration the server cannot start with; the message says which key and why."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ctpipe.serve",
        description="DICOM AI node: receives studies (C-STORE, STOW-RS), runs the exported model "
        "on each complete series, sends the SEG and SR back (docs/serving.md).",
    )
    parser.add_argument("--config", type=Path, default=Path("serve.yaml"))
    parser.add_argument("--host", help="bind address (default from the config: 127.0.0.1)")
    parser.add_argument("--dicom-port", type=int)
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--ae-title")
    parser.add_argument("--package", type=Path)
    parser.add_argument("--model", choices=["fp32", "int8"])
    parser.add_argument("--spool-dir", type=Path)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--quiet-seconds", type=float)
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> dict:
    """The config file with the flags applied, checked."""
    if not args.config.is_file():
        raise ConfigError(f"{args.config}: no such config file")
    cfg = copy.deepcopy(yaml.safe_load(args.config.read_text()) or {})
    flags = {
        ("host",): args.host,
        ("dicom", "port"): args.dicom_port,
        ("http", "port"): args.http_port,
        ("dicom", "ae_title"): args.ae_title,
        ("package",): args.package,
        ("model",): args.model,
        ("spool_dir",): args.spool_dir,
        ("workers",): args.workers,
        ("quiet_seconds",): args.quiet_seconds,
    }
    for keys, value in flags.items():
        if value is not None:
            section = cfg
            for key in keys[:-1]:
                section = section.setdefault(key, {})
            section[keys[-1]] = str(value) if isinstance(value, Path) else value
    check(cfg)
    return cfg


def check(cfg: dict) -> None:
    for key in ("host", "package", "model", "spool_dir", "workers", "quiet_seconds", "dicom"):
        if key not in cfg:
            raise ConfigError(f"config: missing key {key!r}")
    if cfg["model"] not in ("fp32", "int8"):
        raise ConfigError(f"config: model {cfg['model']!r} is not fp32 or int8")
    kind = cfg.get("destination", {}).get("kind", "none")
    if kind not in ("none", "dicom", "dicomweb"):
        raise ConfigError(f"config: destination.kind {kind!r} is not none, dicom or dicomweb")
    if not cfg["dicom"].get("allowed_callers"):
        raise ConfigError("config: dicom.allowed_callers is empty: nobody could send a study")


def token(cfg: dict) -> str:
    """The HTTP bearer token: from ``http.token_env`` (environment) or ``http.token_file``."""
    http = cfg.get("http", {})
    value = os.environ.get(http.get("token_env") or "", "")
    if not value and http.get("token_file"):
        value = Path(http["token_file"]).expanduser().read_text().strip()
    if len(value) < 16:
        raise ConfigError(
            f"no HTTP token of 16 characters or more in ${http.get('token_env')} or "
            f"http.token_file (make one: python -c 'import secrets; print(secrets.token_hex(24))')"
        )
    return value
