"""TLS contexts for the node's listeners and its sends (DICOM TLS, PS3.15 Annex B; HTTPS)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

from ctpipe.serve.config import Tls

HANDSHAKE_SECONDS = 10  # a caller that never finishes its handshake does not hold the listener


def server_context(tls: Tls) -> ssl.SSLContext:
    """A listener's context: its certificate, and the callers' CA when it verifies them."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.ca is not None:
        ctx.load_verify_locations(tls.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: Tls | None) -> ssl.SSLContext:
    """A sender's context: verifies the server against ``tls.ca`` (or the system's CAs) and
    presents ``tls.cert`` when the server wants a client certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca if tls else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None and tls.cert is not None:
        ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


class AuditedServerContext:
    """What pynetdicom's server calls to wrap each accepted socket: the handshake gets a time
    limit, and a failed one (no certificate, an unknown CA, not TLS at all) is reported to
    ``on_refused(peer, reason)`` before the connection is dropped."""

    def __init__(self, ctx: ssl.SSLContext, on_refused: Callable[[str, str], None]) -> None:
        self.ctx, self.on_refused = ctx, on_refused

    def wrap_socket(self, sock: socket.socket, server_side: bool = True) -> ssl.SSLSocket:
        peer, previous = sock.getpeername()[0], sock.gettimeout()
        sock.settimeout(HANDSHAKE_SECONDS)
        try:
            wrapped = self.ctx.wrap_socket(sock, server_side=server_side)
        except (OSError, ssl.SSLError) as err:
            why = getattr(err, "reason", None) or type(err).__name__
            self.on_refused(peer, f"TLS handshake failed: {why}")
            sock.close()
            raise
        wrapped.settimeout(previous)
        return wrapped
