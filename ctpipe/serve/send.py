"""Results to the destination: C-STORE to an AE (pynetdicom SCU) or STOW-RS to a DICOMweb URL."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import httpx
import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)

RESULT_CLASSES = (
    SegmentationStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)


class SendError(RuntimeError):
    """The destination did not take the results; the message says why (retried later)."""


def send(files: list[Path], destination: dict, calling_ae: str) -> None:
    """Send every file, or raise :class:`SendError` (nothing is assumed delivered then)."""
    kind = destination.get("kind", "none")
    if kind == "dicom":
        c_store(files, destination, calling_ae)
    elif kind == "dicomweb":
        stow(files, destination)


def c_store(files: list[Path], dest: dict, calling_ae: str) -> None:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in RESULT_CLASSES:
        ae.add_requested_context(sop_class)
    assoc = ae.associate(dest["host"], int(dest["port"]), ae_title=dest["ae_title"])
    if not assoc.is_established:
        raise SendError(f"association with {dest['ae_title']}@{dest['host']}:{dest['port']} failed")
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            code = getattr(status, "Status", None)
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success or warning
                raise SendError(f"C-STORE of {path.parent.name}/{path.name}: status {code}")
    finally:
        assoc.release()


def multipart_related(blobs: list[bytes]) -> tuple[bytes, str]:
    """A STOW-RS body of DICOM files, and its Content-Type header."""
    boundary = uuid.uuid4().hex.encode()
    parts = b"".join(
        b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + blob + b"\r\n"
        for blob in blobs
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary.decode()}'
    return parts + b"--" + boundary + b"--\r\n", content_type


def stow(files: list[Path], dest: dict) -> None:
    body, content_type = multipart_related([p.read_bytes() for p in files])
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if dest.get("token_env"):
        headers["Authorization"] = f"Bearer {os.environ.get(dest['token_env'], '')}"
    try:
        response = httpx.post(
            dest["url"].rstrip("/") + "/studies", content=body, headers=headers, timeout=60
        )
    except httpx.HTTPError as err:
        raise SendError(f"STOW-RS to {dest['url']}: {type(err).__name__}") from None
    if response.status_code != 200:
        raise SendError(f"STOW-RS to {dest['url']}: HTTP {response.status_code}")
