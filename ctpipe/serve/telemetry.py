"""Prometheus metrics of one server, and names for logs that carry no PHI."""

from __future__ import annotations

import hashlib
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info


def tag(uid: str) -> str:
    """A UID as logs show it: a short hash, never the UID (UIDs can be traced back to patients)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:12]


class Metrics:
    """The server's metrics in a registry of its own (one per server; tests run several)."""

    def __init__(self, model_version: str) -> None:
        self.registry = CollectorRegistry()
        label = {"model_version": model_version}
        self.model = Info("ctpipe_model", "The exported package served", registry=self.registry)
        self.model.info(label)
        self.instances = Counter(
            "ctpipe_instances_received",
            "DICOM instances received, by protocol and outcome",
            ["protocol", "outcome"],
            registry=self.registry,
        )
        self.jobs = Counter(
            "ctpipe_jobs",
            "Finished jobs (one per received series), by outcome",
            ["outcome", "model_version"],
            registry=self.registry,
        )
        self.sends = Counter(
            "ctpipe_result_sends",
            "Attempts to send results to the destination, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "ctpipe_queue_depth", "Jobs queued or running", registry=self.registry
        )
        self.inference = Histogram(
            "ctpipe_inference_seconds",
            "Seconds of predict per job",
            ["model_version"],
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.drift = Gauge(
            "ctpipe_drift",
            "1 when the feature of the recent records drifts from the training reference",
            ["feature"],
            registry=self.registry,
        )
        self.drift_p = Gauge(
            "ctpipe_drift_p_value",
            "p-value of the feature's drift test (ctpipe.monitor)",
            ["feature"],
            registry=self.registry,
        )
        self.latest = Gauge(
            "ctpipe_latest_feature",
            "The feature's value in the latest series record",
            ["feature"],
            registry=self.registry,
        )
        self.quarantined = Gauge(
            "ctpipe_jobs_quarantined",
            "Jobs in quarantine/ (their record could not be read; REASON.txt beside each)",
            registry=self.registry,
        )
        self.send_failed = Gauge(
            "ctpipe_jobs_send_failed",
            "Jobs whose results were not delivered after retry.max_attempts",
            registry=self.registry,
        )
        self.free_disk = Gauge(
            "ctpipe_spool_free_bytes",
            "Free bytes on the spool's file system",
            registry=self.registry,
        )
        self.free_disk_watermark = Gauge(
            "ctpipe_spool_min_free_bytes",
            "limits.min_free_disk_mb in bytes: below it the spool refuses new instances",
            registry=self.registry,
        )
        self.refused = Counter(
            "ctpipe_refused",
            "Associations and HTTP requests refused, by protocol and reason",
            ["protocol", "reason"],
            registry=self.registry,
        )
        self.version = model_version

    def update_drift(self, results: list[dict], latest: dict) -> None:
        for result in results:
            self.drift.labels(result["feature"]).set(float(result["drift"]))
            self.drift_p.labels(result["feature"]).set(result["p_value"])
        for feature, value in latest.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.latest.labels(feature).set(value)


_UID_LIKE = re.compile(r"[0-9]+(?:\.[0-9]+){2,}")
_IPV4 = re.compile(
    r"(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}"
)


def _hide(match: re.Match) -> str:
    value = match.group()
    return value if _IPV4.fullmatch(value) else f"uid:{tag(value)}"


def redact(text: str, limit: int = 300) -> str:
    """``text`` for a log line, an error or an API answer: anything shaped like a UID (three or
    more dot-separated numbers, but not an IPv4 address) replaced by its tag; at most ``limit``
    characters."""
    return _UID_LIKE.sub(_hide, str(text))[:limit]
