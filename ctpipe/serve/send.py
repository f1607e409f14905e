"""Results to the destination: C-STORE to an AE (pynetdicom SCU) or STOW-RS to a DICOMweb URL,
over TLS where the config gives it. Error messages name the destination, never a UID."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pydicom
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)

from ctpipe.serve.config import Destination
from ctpipe.serve.tls import client_context

RESULT_CLASSES = (
    SegmentationStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)
TIMEOUT = 30  # seconds for each network step of a send


class SendError(RuntimeError):
    """The destination did not take the results; the message says why (retried later)."""


def destination_name(dest: Destination) -> str:
    """The destination as logs and the audit name it (no credentials, no path of a URL)."""
    if dest.kind == "dicom":
        return f"{dest.ae_title}@{dest.host}:{dest.port}" + (" tls" if dest.tls else "")
    if dest.kind == "dicomweb":
        url = urlsplit(dest.url or "")
        return f"{url.scheme}://{url.hostname}:{url.port or ''}"
    return "none"


def send(files: list[Path], dest: Destination, calling_ae: str) -> None:
    """Send every file, or raise (nothing is assumed delivered then)."""
    if not files:
        raise SendError("the job has no SEG or SR to send")
    if dest.kind == "dicom":
        c_store(files, dest, calling_ae)
    elif dest.kind == "dicomweb":
        stow(files, dest)


def c_store(files: list[Path], dest: Destination, calling_ae: str) -> None:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT
    for sop_class in RESULT_CLASSES:
        ae.add_requested_context(sop_class)
    tls = (client_context(dest.tls), dest.host) if dest.tls else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls)
    if not assoc.is_established:
        raise SendError(f"association with {destination_name(dest)} failed")
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        for path in files:
            ds = pydicom.dcmread(path)
            if ds.SOPClassUID not in accepted:
                name = UID(ds.SOPClassUID).name
                raise SendError(f"{destination_name(dest)} accepts no {name}")
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code not in (0x0000, 0xB000, 0xB006, 0xB007):  # success or warning
                shown = "none" if code is None else f"0x{code:04X}"
                raise SendError(
                    f"C-STORE of the {ds.Modality} to {destination_name(dest)}: {shown}"
                )
    finally:
        assoc.release()


def multipart_related(blobs: list[bytes]) -> tuple[bytes, str]:
    """A STOW-RS body of DICOM files, and its Content-Type header."""
    boundary = os.urandom(16).hex().encode()
    parts = b"".join(
        b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n" + blob + b"\r\n"
        for blob in blobs
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary.decode()}'
    return parts + b"--" + boundary + b"--\r\n", content_type


def stow(files: list[Path], dest: Destination) -> None:
    body, content_type = multipart_related([p.read_bytes() for p in files])
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if dest.token_env:
        token = os.environ.get(dest.token_env, "")
        if not token:
            raise SendError(f"${dest.token_env} is empty: no token to send")
        headers["Authorization"] = f"Bearer {token}"
    url = str(dest.url).rstrip("/") + "/studies"
    verify = client_context(dest.tls) if url.startswith("https://") else True
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT, verify=verify)
    except httpx.HTTPError as err:
        raise SendError(f"STOW-RS to {destination_name(dest)}: {type(err).__name__}") from None
    if response.status_code != 200:
        raise SendError(f"STOW-RS to {destination_name(dest)}: HTTP {response.status_code}")
