"""The server's configuration: one YAML file (``serve.yaml``) checked against a schema when the
server starts, and flags that override it. Secrets never live in it: HTTP tokens come from a file
outside git that holds only their hashes (:mod:`ctpipe.serve.tokens`), TLS keys from files."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Port = Field(ge=0, le=65535)  # 0: any free port (tests)
ROLES = ("all", "receiver", "worker")


class ConfigError(ValueError):
    """A configuration the server cannot start with; the message says which key and why."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tls(Section):
    """TLS of a listener (``cert`` + ``key``) or of a client (``ca`` to verify the server,
    ``cert`` + ``key`` when the server wants a client certificate)."""

    cert: Path | None = None  # PEM certificate (chain) this side presents
    key: Path | None = None  # PEM private key of ``cert``
    ca: Path | None = None  # PEM CA bundle that the other side's certificate must chain to
    require_client_cert: bool = False  # listener: refuse callers without a certificate from ``ca``

    @model_validator(mode="after")
    def _pairs(self) -> Tls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs ca (the CA of the accepted callers)")
        for path in (self.cert, self.key, self.ca):
            if path is not None and not path.is_file():
                raise ValueError(f"{path}: no such file")
        return self


class Caller(Section):
    ae_title: str = Field(min_length=1, max_length=16)
    host: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None  # None: from any address


class Dicom(Section):
    ae_title: str = Field(min_length=1, max_length=16)
    port: int = Port
    allowed_callers: list[Caller] = Field(min_length=1)
    tls: Tls | None = None


class Http(Section):
    port: int = Port
    tokens_file: Path  # named, hashed tokens with scopes (python -m ctpipe.serve.tokens)
    tls: Tls | None = None


class Destination(Section):
    kind: Literal["none", "dicom", "dicomweb"] = "none"
    ae_title: str = Field("ORTHANC", min_length=1, max_length=16)
    host: str = "127.0.0.1"
    port: int = Field(4242, ge=1, le=65535)
    url: str | None = None
    token_env: str | None = None  # dicomweb: environment variable with the bearer token
    tls: Tls | None = None


class Limits(Section):
    max_request_mb: float = Field(512, gt=0)
    max_study_mb: float = Field(2048, gt=0)
    min_free_disk_mb: float = Field(1024, ge=0)
    max_associations: int = Field(10, ge=1)
    max_requests: int = Field(32, ge=1)
    calls_per_minute: int = Field(600, ge=1)


class Retry(Section):
    first_seconds: float = Field(2, gt=0)
    max_seconds: float = Field(300, gt=0)
    max_attempts: int = Field(10, ge=1)
    jitter: float = Field(0.25, ge=0, le=1)


class Retention(Section):
    hold_hours: float = Field(24, ge=0)
    jobs_days: float = Field(7, gt=0)


class Monitor(Section):
    reference: Path | None = None
    window: int = Field(200, ge=1)
    alpha: float = Field(0.01, gt=0, lt=1)


class Queue(Section):
    """Where jobs wait: ``local`` (the spool, one process) or a RabbitMQ broker (the roles)."""

    kind: Literal["local", "rabbitmq"] = "local"
    url: str | None = None  # rabbitmq: amqp(s)://USER@HOST:PORT/VHOST, never with a password
    password_env: str | None = None  # environment variable with USER's password; null: guest
    name: str = Field("ctpipe.jobs", pattern=r"^[A-Za-z0-9_.:-]{1,200}$")  # queue name prefix
    shared_roots: list[Path] = []  # folders retrospective runs may read from and write into

    @model_validator(mode="after")
    def _broker(self) -> Queue:
        if self.kind == "local":
            return self
        url = urlsplit(self.url or "")
        if url.scheme not in ("amqp", "amqps") or not url.hostname:
            raise ValueError("url: an amqp:// or amqps:// URL is needed for kind rabbitmq")
        if url.password is not None:
            raise ValueError(
                "url carries a password: secrets never go in the config file; "
                "name an environment variable in password_env instead"
            )
        if self.password_env is None and (url.username or "guest") != "guest":
            raise ValueError(f"password_env: needed for user {url.username!r} (null: guest only)")
        if self.password_env and not os.environ.get(self.password_env):
            raise ValueError(f"password_env: ${self.password_env} is not set")
        return self


class ServeConfig(Section):
    host: str = "127.0.0.1"
    allow_plaintext: bool = False
    package: Path
    model: Literal["fp32", "int8"]
    spool_dir: Path
    workers: int = Field(ge=1, le=64)
    quiet_seconds: float = Field(ge=0)
    predict_timeout_seconds: float = Field(900, gt=0)
    audit_log: Path | None = None
    records_dir: Path | None = None
    log_format: Literal["text", "json"] = "text"  # json: one object per line (ctpipe.serve.logs)
    limits: Limits = Limits()
    dicom: Dicom
    http: Http
    destination: Destination = Destination()
    retry: Retry = Retry()
    retention: Retention = Retention()
    monitor: Monitor = Monitor()
    queue: Queue = Queue()

    @model_validator(mode="after")
    def _transport(self) -> ServeConfig:
        plain = [name for name, s in (("dicom", self.dicom), ("http", self.http)) if s.tls is None]
        if plain and not loopback(self.host) and not self.allow_plaintext:
            raise ValueError(
                f"{' and '.join(plain)} without tls on {self.host}, beyond localhost: "
                "set tls, or allow_plaintext: true"
            )
        dest = self.destination
        if dest.kind == "dicomweb":
            scheme = urlsplit(dest.url or "").scheme
            if scheme not in ("http", "https"):
                raise ValueError("destination.url: an http(s) URL is needed for dicomweb")
            if scheme == "http" and not self.allow_plaintext:
                raise ValueError("destination.url is http://: use https, or allow_plaintext: true")
            if dest.token_env and not os.environ.get(dest.token_env):
                raise ValueError(f"destination.token_env: ${dest.token_env} is not set")
        if dest.kind == "dicom" and dest.tls is None and not loopback(dest.host):
            if not self.allow_plaintext:
                raise ValueError("destination beyond localhost without tls: allow_plaintext: true")
        broker = urlsplit(self.queue.url or "")
        if broker.scheme == "amqp" and not loopback(broker.hostname or ""):
            if not self.allow_plaintext:
                raise ValueError("queue.url: amqp:// beyond localhost: amqps, or allow_plaintext")
        return self

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.spool_dir / "audit.jsonl"

    @property
    def records_path(self) -> Path:
        return self.records_dir or self.spool_dir / "records"


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ctpipe.serve",
        description="DICOM AI node: receives studies (C-STORE, STOW-RS), runs the exported model "
        "on each complete series, sends the SEG and SR back (docs/serving.md).",
    )
    parser.add_argument("--config", type=Path, default=Path("serve.yaml"))
    parser.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="all: the one-process node (default); receiver: DICOM and STOW-RS, publishes jobs; "
        "worker: consumes jobs, predicts, sends (both need queue.kind: rabbitmq)",
    )
    parser.add_argument("--host", help="bind address (default from the config: 127.0.0.1)")
    parser.add_argument("--dicom-port", type=int)
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--ae-title")
    parser.add_argument("--package", type=Path)
    parser.add_argument("--model", choices=["fp32", "int8"])
    parser.add_argument("--spool-dir", type=Path)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--quiet-seconds", type=float)
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="text, or JSON lines for a log collector"
    )
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> ServeConfig:
    """The config file with the flags applied, checked."""
    if not args.config.is_file():
        raise ConfigError(f"{args.config}: no such config file")
    try:
        raw = yaml.safe_load(args.config.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{args.config}: not YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{args.config}: expected a mapping of keys")
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
        ("log_format",): args.log_format,
    }
    for keys, value in flags.items():
        if value is not None:
            section = raw
            for key in keys[:-1]:
                section = section.setdefault(key, {})
            section[keys[-1]] = str(value) if isinstance(value, Path) else value
    cfg = parse(raw, source=str(args.config))
    role = getattr(args, "role", "all")
    if role != "all" and cfg.queue.kind != "rabbitmq":
        raise ConfigError(
            f"{args.config}: queue.kind: --role {role} needs rabbitmq (is {cfg.queue.kind}); "
            "the roles share their jobs through a broker"
        )
    return cfg


def parse(raw: dict, source: str = "config") -> ServeConfig:
    """``raw`` checked against the schema, or :class:`ConfigError` naming each bad key."""
    try:
        return ServeConfig.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(k) for k in e["loc"]) or "(top level)"
            given = f" (given: {e['input']!r})" if e["type"] != "missing" else ""
            problems.append(f"{key}: {e['msg']}{given if len(given) < 80 else ''}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
