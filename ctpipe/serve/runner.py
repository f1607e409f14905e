"""The server's loops: complete series become jobs, workers run predict on them, a sender delivers
the results with back-off. Each loop is a thread; all state is in the :class:`Spool`."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ctpipe.deploy.predict import predict_study
from ctpipe.monitor import drift
from ctpipe.monitor import record as series_records
from ctpipe.serve.send import SendError, send
from ctpipe.serve.spool import Spool
from ctpipe.serve.telemetry import Metrics

log = logging.getLogger("ctpipe.serve")
TICK = 0.5  # seconds between looks at the spool


class Runner:
    def __init__(self, spool: Spool, cfg: dict, metrics: Metrics) -> None:
        self.spool, self.cfg, self.metrics = spool, cfg, metrics
        self.package = Path(cfg["package"])
        self.destination = cfg.get("destination", {"kind": "none"})
        self.retry = cfg.get("retry", {"first_seconds": 2, "max_seconds": 300})
        self.records = Path(cfg.get("records_dir") or Path(cfg["spool_dir"]) / "records")
        self.records.mkdir(parents=True, exist_ok=True)
        monitor = cfg.get("monitor", {})
        reference = Path(monitor.get("reference") or "")
        self.reference = series_records.load_reference(reference) if reference.is_file() else None
        self.window, self.alpha = int(monitor.get("window", 200)), float(monitor.get("alpha", 0.01))
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        recovered = self.spool.recover()
        log.info("spool recovered: %s", recovered)
        self.metrics.queue_depth.set(self.spool.depth())
        loops = [self.schedule, self.deliver] + [self.work] * int(self.cfg["workers"])
        for i, loop in enumerate(loops):
            thread = threading.Thread(target=self._forever, args=(loop,), name=f"ctpipe-{i}")
            thread.daemon = True
            thread.start()
            self.threads.append(thread)

    def shutdown(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)

    def _forever(self, step) -> None:
        while not self.stop.is_set():
            try:
                busy = step()
            except Exception:  # noqa: BLE001 - a loop never dies; the job records say why
                log.exception("%s failed; continuing", step.__name__)
                busy = False
            if busy:  # the queue changed (a job made, claimed or finished): one count, not per tick
                self.metrics.queue_depth.set(self.spool.depth())
            else:
                self.stop.wait(TICK)

    # -- the loops (each returns whether it did something) -----------------------------------
    def schedule(self) -> bool:
        made = [self.spool.make_job(series) for series in self.spool.complete_series()]
        for job_id in made:
            log.info("job %s queued", job_id)
        return bool(made)

    def work(self) -> bool:
        record = self.spool.claim()
        if record is None:
            return False
        folder = self.spool.jobs / record["id"]
        start = time.perf_counter()
        try:
            summary = predict_study(
                folder / "input", self.package, self.cfg["model"], folder / "out", self.records
            )
            series = list(summary["series"].values())
            if summary["predicted"]:
                status, reason = "predicted", ""
            else:
                status = "failed" if any(s["status"] == "failed" for s in series) else "refused"
                reason = "; ".join(sorted({s.get("reason", "") for s in series})) or "no series"
        except Exception as err:  # noqa: BLE001 - the job fails with its reason, the server lives
            status, reason = "failed", f"{type(err).__name__}: {err}"
        seconds = time.perf_counter() - start
        record.update(
            status=status,
            reason=reason,
            finished=time.time(),
            inference_seconds=round(seconds, 3),
            send="pending" if status == "predicted" else "none",
        )
        self.spool.save(record)
        self.metrics.jobs.labels(status, self.metrics.version).inc()
        self.metrics.inference.labels(self.metrics.version).observe(seconds)
        log.info("job %s %s in %.1f s %s", record["id"], status, seconds, reason)
        self.check_drift()
        return True

    def check_drift(self) -> None:
        """Drift of the newest records against the training reference, as Prometheus gauges."""
        if self.reference is None:
            return
        window = series_records.load(self.records, newest=self.window)
        if window:
            self.metrics.update_drift(drift.compare(self.reference, window, self.alpha), window[-1])

    def deliver(self) -> bool:
        if self.destination.get("kind", "none") == "none":
            return False
        now = time.time()
        for record in self.spool.records():
            due = record["send"] in ("pending", "retrying") and record["next_attempt"] <= now
            if record["status"] != "predicted" or not due:
                continue
            try:
                send(
                    self.spool.results(record["id"]),
                    self.destination,
                    self.cfg["dicom"]["ae_title"],
                )
            except (SendError, OSError) as err:
                record["attempts"] += 1
                wait = min(
                    float(self.retry["max_seconds"]),
                    float(self.retry["first_seconds"]) * 2 ** (record["attempts"] - 1),
                )
                record.update(send="retrying", next_attempt=now + wait, send_error=str(err))
                self.metrics.sends.labels("failed").inc()
                log.warning("job %s: send failed (%s), retry in %.0f s", record["id"], err, wait)
            else:
                record.update(send="sent", sent=time.time(), send_error="")
                self.metrics.sends.labels("sent").inc()
                log.info("job %s: results sent", record["id"])
            self.spool.save(record)
            return True
        return False
