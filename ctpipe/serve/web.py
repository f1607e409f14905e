"""The HTTP side (FastAPI): STOW-RS ``POST /dicom-web/studies`` (PS3.18 10.5), ``/healthz``,
``/readyz``, ``/jobs``, ``/jobs/{id}`` and ``/metrics`` (Prometheus text format).

Every endpoint but the two probes needs ``Authorization: Bearer <token>``. The multipart/related
body is split by the standard library's MIME parser (``email``), not by hand.
"""

from __future__ import annotations

import email.parser
import email.policy
import hmac
import io
import logging
from pathlib import Path

import pydicom
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ctpipe.serve.spool import Refused, Spool, instance_uids
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
)


def parts(body: bytes, content_type: str) -> list[bytes]:
    """The payloads of a multipart/related body."""
    if not content_type.lower().startswith("multipart/related"):
        raise HTTPException(415, 'expected multipart/related; type="application/dicom"')
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise HTTPException(400, "no multipart body")
    return [p.get_payload(decode=True) or b"" for p in message.iter_parts()]


def sop_item(cls: str, uid: str, reason: int | None = None) -> dict:
    item = {}
    if cls:
        item["00081150"] = {"vr": "UI", "Value": [cls]}
    if uid:
        item["00081155"] = {"vr": "UI", "Value": [uid]}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def store_part(data: bytes, spool: Spool) -> tuple[str, str, int | None]:
    """(SOP class, SOP instance, failure reason or None) of one part, stored when it is good."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        cls = str(ds.get("SOPClassUID", "") or "")
        study, series, sop = instance_uids(ds)
    except Exception:  # noqa: BLE001 - not DICOM, truncated: a failed SOP entry
        return "", "", CANNOT_UNDERSTAND
    if not (study and series and sop):
        return cls, sop, CANNOT_UNDERSTAND
    try:
        spool.receive(data, study, series, sop)
    except Refused:
        return cls, sop, OUT_OF_RESOURCES
    except OSError:
        return cls, sop, PROCESSING_FAILURE
    return cls, sop, None


def create_app(cfg: dict, spool: Spool, metrics: Metrics, token: str) -> FastAPI:
    app = FastAPI(title="ctpipe serve", docs_url=None, redoc_url=None)
    max_body = int(float(cfg.get("max_request_mb", 512)) * (1 << 20))
    package = Path(cfg["package"])

    def authorised(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "bearer token required", {"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        checks = {
            "model": (package / "input_spec.json").is_file()
            and (
                package / ("model.onnx" if cfg["model"] == "fp32" else "model_int8.onnx")
            ).is_file(),
            "queue_writable": _writable(spool.jobs),
        }
        return JSONResponse(
            {"ready": all(checks.values()), **checks}, 200 if all(checks.values()) else 503
        )

    @app.get("/jobs", dependencies=[Depends(authorised)])
    def jobs() -> list[dict]:
        return [{k: r.get(k) for k in PUBLIC_FIELDS} for r in spool.records()]

    @app.get("/jobs/{job_id}", dependencies=[Depends(authorised)])
    def job(job_id: str) -> dict:
        if "/" in job_id or not (spool.jobs / job_id / "job.json").is_file():
            raise HTTPException(404, "no such job")
        record = spool.load(job_id)
        return {k: record.get(k) for k in PUBLIC_FIELDS}

    @app.get("/metrics", dependencies=[Depends(authorised)])
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/dicom-web/studies", dependencies=[Depends(authorised)])
    async def stow(request: Request) -> JSONResponse:
        if int(request.headers.get("content-length") or 0) > max_body:
            raise HTTPException(413, f"request larger than max_request_mb ({max_body >> 20} MB)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise HTTPException(
                    413, f"request larger than max_request_mb ({max_body >> 20} MB)"
                )
        stored, failed = [], []
        for data in parts(bytes(body), request.headers.get("content-type", "")):
            cls, sop, reason = store_part(data, spool)
            outcome = "stored" if reason is None else "failed"
            metrics.instances.labels("stow", outcome).inc()
            (stored if reason is None else failed).append(sop_item(cls, sop, reason))
        result = {}
        if stored:
            result["00081199"] = {"vr": "SQ", "Value": stored}
        if failed:
            result["00081198"] = {"vr": "SQ", "Value": failed}
        code = 200 if not failed else (202 if stored else 409)
        return JSONResponse(result, code, media_type="application/dicom+json")

    return app


def _writable(folder: Path) -> bool:
    try:
        probe = folder / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False
