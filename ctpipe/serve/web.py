"""The HTTP side (FastAPI): STOW-RS ``POST /dicom-web/studies`` (PS3.18 10.5), ``/healthz``,
``/readyz``, ``/jobs``, ``/jobs/{id}`` and ``/metrics`` (Prometheus text format).

Every endpoint but the two probes needs ``Authorization: Bearer <token>`` with a named token of
the right scope (401 without a valid token, 403 without the scope, 429 over the caller's calls a
minute). The multipart/related body is parsed as a stream by python-multipart, off the event
loop, each part written straight to the spool's disk: memory stays bounded whatever the size.
Every request is in the audit log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from ctpipe.serve import tokens as tokens_file
from ctpipe.serve.audit import Audit
from ctpipe.serve.config import ServeConfig
from ctpipe.serve.limits import RateLimit
from ctpipe.serve.spool import JOB_ID, Refused, Spool, instance_uids
from ctpipe.serve.telemetry import Metrics

log = logging.getLogger("ctpipe.serve")
PROCESSING_FAILURE, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0110, 0xA700, 0xC000
PUBLIC_FIELDS = (
    "id",
    "status",
    "reason",
    "instances",
    "received_last",
    "queued",
    "started",
    "finished",
    "inference_seconds",
    "send",
    "attempts",
    "send_error",
    "sent",
    "done",
    "input_deleted",
)


def sop_item(cls: str, uid: str, reason: int | None = None) -> dict:
    item = {}
    if cls:
        item["00081150"] = {"vr": "UI", "Value": [cls]}
    if uid:
        item["00081155"] = {"vr": "UI", "Value": [uid]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


class StowReceiver:
    """A multipart/related body fed chunk by chunk: each part goes to a file in the spool's
    ``.tmp`` as it arrives, and is stored (or listed as failed) when it ends."""

    def __init__(self, boundary: bytes, spool: Spool) -> None:
        self.spool, self.file, self.tmp = spool, None, None
        self.stored: list[dict] = []
        self.failed: list[dict] = []
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def finish(self) -> None:
        self.parser.finalize()
        self.abort()  # a last part without its closing boundary is not stored

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            self.file = self.tmp = None

    def _begin(self) -> None:
        self.tmp = self.spool.new_tmp()
        self.file = open(self.tmp, "wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.file.write(data[start:end])

    def _end(self) -> None:
        self.file.close()
        tmp, self.file, self.tmp = self.tmp, None, None
        cls, sop, reason = store_part(tmp, self.spool)
        (self.stored if reason is None else self.failed).append(sop_item(cls, sop, reason))


def store_part(tmp: Path, spool: Spool) -> tuple[str, str, int | None]:
    """(SOP class, SOP instance, failure reason or None) of one received part; ``tmp`` is moved
    into the spool when it is good, deleted otherwise."""
    try:
        try:
            ds = pydicom.dcmread(tmp, stop_before_pixels=True)
            cls = str(ds.get("SOPClassUID", "") or "")
            study, series, sop = instance_uids(ds)
        except Exception:  # noqa: BLE001 - not DICOM, truncated: a failed SOP entry
            return "", "", CANNOT_UNDERSTAND
        try:
            spool.place(tmp, study, series, sop)
        except Refused as err:  # an invalid UID is not echoed back: it is not a UID
            return (
                cls,
                sop if err.resources else "",
                (OUT_OF_RESOURCES if err.resources else CANNOT_UNDERSTAND),
            )
        except OSError:
            return cls, sop, PROCESSING_FAILURE
        return cls, sop, None
    finally:
        tmp.unlink(missing_ok=True)


def boundary_of(content_type: str) -> bytes:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/related":
        raise HTTPException(415, 'expected multipart/related; type="application/dicom"')
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:  # RFC 2046 says 70; Orthanc sends 73
        raise HTTPException(400, "multipart/related without a usable boundary")
    return boundary


def create_app(
    cfg: ServeConfig,
    spool: Spool,
    metrics: Metrics,
    tokens: list,
    audit: Audit,
    role: str = "all",
    broker: Callable[[], bool] | None = None,
) -> FastAPI:
    """The node's HTTP side; a ``worker`` serves only the probes and ``/metrics``. ``broker``
    says whether the broker is connected (the roles): a worker is ready only then, a receiver
    reports it (it keeps receiving into the spool, and publishes when the broker is back)."""
    app = FastAPI(title="ctpipe serve", docs_url=None, redoc_url=None, openapi_url=None)
    rate = RateLimit(cfg.limits.calls_per_minute)
    protocol = "https" if cfg.http.tls else "http"

    def authorised(request: Request, scope: str) -> None:
        """401 without a valid token, 403 without ``scope``, 429 over the calls a minute."""
        given = request.headers.get("authorization", "")
        kind, _, value = given.partition(" ")
        token = tokens_file.identify(tokens, value) if kind.lower() == "bearer" else None
        if token is None:
            metrics.refused.labels(protocol, "token").inc()
            raise HTTPException(401, "bearer token required", {"WWW-Authenticate": "Bearer"})
        request.state.token = token.name
        if scope not in token.scopes:
            metrics.refused.labels(protocol, "scope").inc()
            raise HTTPException(403, f"token {token.name} lacks the {scope} scope")
        if not rate.allow(token.name):
            metrics.refused.labels(protocol, "rate").inc()
            raise HTTPException(429, "limits.calls_per_minute exceeded", {"Retry-After": "60"})

    @app.middleware("http")
    async def audited(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            if not request.url.path.endswith(("/healthz", "/readyz")):  # probes: every few s
                audit(
                    "request",
                    "accepted" if status < 400 else "refused",
                    protocol=protocol,
                    peer=request.client.host if request.client else None,
                    method=request.method,
                    path=route.path if route is not None else "(no route)",
                    status=status,
                    token=getattr(request.state, "token", None),
                    seconds=round(time.perf_counter() - start, 3),
                )

    _add_status_routes(app, cfg, spool, metrics, authorised, role, broker)
    if role != "worker":
        _add_stow(app, cfg, spool, metrics, authorised)
    return app


def _add_status_routes(
    app: FastAPI, cfg: ServeConfig, spool: Spool, metrics: Metrics, authorised, role, broker
) -> None:
    """The probes (open), the job records (``read``) and the metrics (``metrics``)."""

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        onnx = "model.onnx" if cfg.model == "fp32" else "model_int8.onnx"
        low = spool.low_disk()
        checks = {
            "model": (cfg.package / "input_spec.json").is_file() and (cfg.package / onnx).is_file(),
            "queue_writable": _writable(spool.jobs),
            "disk": not low,
        }
        if role == "worker":
            checks["broker"] = broker()
        ready = all(checks.values())
        if role == "receiver":
            checks["broker"] = broker()
        body = {"ready": ready, **checks, **({"reason": low} if low else {})}
        return JSONResponse(body, 200 if ready else 503)

    @app.get("/metrics")
    def prometheus(request: Request) -> Response:
        authorised(request, "metrics")
        metrics.free_disk.set(spool.free_bytes())
        metrics.free_disk_watermark.set(spool.min_free)  # the alert compares with the node's own
        metrics.quarantined.set(sum(1 for _ in spool.quarantine.iterdir()))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if role == "worker":
        return

    @app.get("/jobs")
    def jobs(request: Request) -> list[dict]:
        authorised(request, "read")
        return [public(r) for r in spool.records()]

    @app.get("/jobs/{job_id}")
    def job(job_id: str, request: Request) -> dict:
        authorised(request, "read")
        if not JOB_ID.fullmatch(job_id) or not (spool.jobs / job_id / "job.json").is_file():
            raise HTTPException(404, "no such job")
        return public(spool.load(job_id))

    def public(record: dict) -> dict:
        out = {k: record.get(k) for k in PUBLIC_FIELDS}
        done, keep = record.get("done"), cfg.retention
        out["input_expires"] = (
            done + keep.hold_hours * 3600 if done and not record.get("input_deleted") else None
        )
        out["expires"] = done + keep.jobs_days * 86400 if done else None
        return out


def _add_stow(app: FastAPI, cfg: ServeConfig, spool: Spool, metrics: Metrics, authorised) -> None:
    """STOW-RS (``store``): the body streamed, part by part, to the spool's disk."""
    max_body = int(cfg.limits.max_request_mb * (1 << 20))

    @app.post("/dicom-web/studies")
    async def stow(request: Request) -> JSONResponse:
        authorised(request, "store")
        if int(request.headers.get("content-length") or 0) > max_body:
            raise HTTPException(413, f"request larger than max_request_mb ({max_body >> 20} MB)")
        low = spool.low_disk()
        if low:
            raise HTTPException(507, low)
        receiver = StowReceiver(boundary_of(request.headers.get("content-type", "")), spool)
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise HTTPException(
                        413, f"request larger than max_request_mb ({max_body >> 20} MB)"
                    )
                await run_in_threadpool(receiver.feed, chunk)
            await run_in_threadpool(receiver.finish)
        finally:
            receiver.abort()
        metrics.instances.labels("stow", "stored").inc(len(receiver.stored))
        metrics.instances.labels("stow", "failed").inc(len(receiver.failed))
        if not receiver.stored and not receiver.failed:
            raise HTTPException(400, "no parts in the multipart/related body")
        result = {}
        if receiver.stored:
            result["00081199"] = {"vr": "SQ", "Value": receiver.stored}
        if receiver.failed:
            result["00081198"] = {"vr": "SQ", "Value": receiver.failed}
        code = 200 if not receiver.failed else (202 if receiver.stored else 409)
        return JSONResponse(result, code, media_type="application/dicom+json")


def _writable(folder: Path) -> bool:
    try:
        probe = folder / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False
