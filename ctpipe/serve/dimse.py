"""The DICOM listener: a C-STORE SCP (every storage SOP class) and C-ECHO, over DICOM TLS when
the config gives it, for the configured calling AE titles (and hosts) only, within the limits on
associations and calls a minute. Each instance goes to the spool before success is answered;
every association is in the audit log."""

from __future__ import annotations

import io
import logging
import threading

import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from ctpipe.serve.audit import Audit
from ctpipe.serve.config import ServeConfig
from ctpipe.serve.limits import RateLimit
from ctpipe.serve.spool import Refused, Spool, instance_uids
from ctpipe.serve.telemetry import Metrics
from ctpipe.serve.tls import AuditedServerContext, server_context

log = logging.getLogger("ctpipe.serve")
OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0xA700, 0xC000
# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
NOT_RECOGNISED = (0x01, 0x01, 0x03)  # permanent: calling AE title not recognised
LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient: local limit exceeded


def encoded(ds: pydicom.Dataset, meta) -> bytes:
    """The received dataset as a DICOM file (file meta of the association, dataset as sent)."""
    buffer = io.BytesIO()
    ds.file_meta = meta
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class StoreSCP:
    def __init__(self, cfg: ServeConfig, spool: Spool, metrics: Metrics, audit: Audit) -> None:
        self.cfg, self.spool, self.metrics, self.audit = cfg.dicom, spool, metrics, audit
        self.host, self.limits = cfg.host, cfg.limits
        self.allowed = {c.ae_title.strip(): c.host for c in self.cfg.allowed_callers}
        self.rate = RateLimit(cfg.limits.calls_per_minute)
        self.protocol = "dimse-tls" if self.cfg.tls else "dimse"
        self.ae = AE(ae_title=self.cfg.ae_title)
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(Verification)
        self.ae.require_calling_aet = list(self.allowed)
        self.ae.require_called_aet = True
        self.ae.maximum_associations = cfg.limits.max_associations
        self.server = None
        self.counts: dict[int, dict[str, int]] = {}  # association -> outcome -> instances
        self.lock = threading.Lock()

    def start(self) -> None:
        handlers = [
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_REQUESTED, self.on_request),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
        ]
        ssl = None
        if self.cfg.tls is not None:
            ssl = AuditedServerContext(server_context(self.cfg.tls), self.on_handshake_failed)
        self.server = self.ae.start_server(
            (self.host, self.cfg.port), block=False, evt_handlers=handlers, ssl_context=ssl
        )

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def _audit(self, assoc, outcome: str, **fields) -> None:
        self.audit(
            "association",
            outcome,
            protocol=self.protocol,
            calling_ae=str(assoc.requestor.ae_title).strip(),
            peer=assoc.requestor.address,
            **fields,
        )

    def on_handshake_failed(self, peer: str, reason: str) -> None:
        self.metrics.refused.labels(self.protocol, "tls").inc()
        self.audit("association", "refused", protocol=self.protocol, peer=peer, reason=reason)

    def on_request(self, event) -> None:
        """Reject (A-ASSOCIATE-RJ) what the config does not allow, with the reason audited:
        an unknown calling AE title, an allowed one from another host, a caller over its calls a
        minute, one association more than ``limits.max_associations``."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        assoc.requestor.ae_title = calling
        busy = sum(a.is_acceptor for a in self.ae.active_associations)
        if calling not in self.allowed:
            why, rsd, label = "calling AE title not allowed", NOT_RECOGNISED, "caller"
        elif self.allowed[calling] and assoc.requestor.address != str(self.allowed[calling]):
            why, rsd, label = (
                "calling AE title from a host it is not allowed from",
                NOT_RECOGNISED,
                "caller",
            )
        elif busy > self.limits.max_associations:
            why, rsd, label = "limits.max_associations reached", LOCAL_LIMIT, "busy"
        elif not self.rate.allow(calling):
            why, rsd, label = "limits.calls_per_minute exceeded", LOCAL_LIMIT, "rate"
        else:
            return
        self.metrics.refused.labels(self.protocol, label).inc()
        self._audit(assoc, "refused", reason=why)
        log.warning("association refused: %s", why)
        assoc.acse.send_reject(*rsd)

    def on_accepted(self, event) -> None:
        with self.lock:
            self.counts[id(event.assoc)] = {}
        self._audit(event.assoc, "accepted")

    def on_closed(self, event) -> None:
        with self.lock:
            counts = self.counts.pop(id(event.assoc), None)
        if counts is not None:  # an accepted association ends
            outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
            self._audit(event.assoc, outcome, instances=counts)

    def _count(self, event, outcome: str) -> None:
        self.metrics.instances.labels("dimse", outcome).inc()
        with self.lock:
            counts = self.counts.setdefault(id(event.assoc), {})
            counts[outcome] = counts.get(outcome, 0) + 1

    def on_store(self, event) -> int:
        try:
            ds = event.dataset
            study, series, sop = instance_uids(ds)
            data = encoded(ds, event.file_meta)
            self.spool.receive(data, study, series, sop)
        except Refused as err:
            self._count(event, "refused")
            log.warning("C-STORE refused: %s", err)
            return OUT_OF_RESOURCES if err.resources else CANNOT_UNDERSTAND
        except Exception as err:  # noqa: BLE001 - a bad instance gets a failure status
            self._count(event, "failed")
            log.warning("C-STORE failed: %s", type(err).__name__)
            return CANNOT_UNDERSTAND
        self._count(event, "stored")
        return 0x0000
