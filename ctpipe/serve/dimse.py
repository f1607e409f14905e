"""The DICOM listener: a C-STORE SCP (every storage SOP class) and C-ECHO, for the configured
calling AE titles (and hosts) only. Each instance goes to the spool before success is answered."""

from __future__ import annotations

import io
import logging

import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from ctpipe.serve.spool import Refused, Spool, instance_uids
from ctpipe.serve.telemetry import Metrics, tag

log = logging.getLogger("ctpipe.serve")
OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0xA700, 0xC000


def encoded(ds: pydicom.Dataset, meta) -> bytes:
    """The received dataset as a DICOM file (file meta of the association, dataset as sent)."""
    buffer = io.BytesIO()
    ds.file_meta = meta
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class StoreSCP:
    def __init__(self, cfg: dict, spool: Spool, metrics: Metrics) -> None:
        self.cfg, self.spool, self.metrics = cfg["dicom"], spool, metrics
        self.host = cfg["host"]
        self.allowed = {
            str(c["ae_title"]).strip(): c.get("host") for c in self.cfg["allowed_callers"]
        }
        self.ae = AE(ae_title=self.cfg["ae_title"])
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(Verification)
        self.ae.require_calling_aet = list(self.allowed)
        self.ae.require_called_aet = True
        self.server = None

    def start(self) -> None:
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_REQUESTED, self.on_request)]
        self.server = self.ae.start_server(
            (self.host, int(self.cfg["port"])), block=False, evt_handlers=handlers
        )

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def on_request(self, event) -> None:
        """Reject (A-ASSOCIATE-RJ, calling AE not recognised) an allowed AE title calling from a
        host it is not allowed from; unknown AE titles are rejected by pynetdicom itself."""
        calling = str(event.assoc.requestor.primitive.calling_ae_title).strip()
        host = self.allowed.get(calling)
        if host and event.assoc.requestor.address != host:
            log.warning("association refused: AE title from a host it is not allowed from")
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)

    def on_store(self, event) -> int:
        try:
            ds = event.dataset
            study, series, sop = instance_uids(ds)
            if not (study and series and sop):
                raise ValueError("no Study, Series or SOP Instance UID")
            data = encoded(ds, event.file_meta)
        except Exception as err:  # noqa: BLE001 - a bad instance gets a failure status
            self.metrics.instances.labels("dimse", "failed").inc()
            log.warning("C-STORE refused: %s", type(err).__name__)
            return CANNOT_UNDERSTAND
        try:
            self.spool.receive(data, study, series, sop)
        except Refused as err:
            self.metrics.instances.labels("dimse", "refused").inc()
            log.warning("C-STORE of series %s refused: %s", tag(series), err)
            return OUT_OF_RESOURCES
        self.metrics.instances.labels("dimse", "stored").inc()
        return 0x0000
