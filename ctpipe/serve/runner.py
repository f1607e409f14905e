"""The server's loops: complete series become jobs, workers run predict on them (each in a child
process with a time limit), a sender delivers the results with bounded, jittered back-off, and
the retention policy deletes what is no longer needed. Each loop is a thread; all state is in
the :class:`Spool`, so no job can stand in the way of another."""

from __future__ import annotations

import logging
import random
import shutil
import threading
import time

from ctpipe.monitor import drift
from ctpipe.monitor import record as series_records
from ctpipe.safepath import inside
from ctpipe.serve.audit import Audit
from ctpipe.serve.config import ServeConfig
from ctpipe.serve.send import destination_name, send
from ctpipe.serve.spool import Spool
from ctpipe.serve.telemetry import Metrics, redact
from ctpipe.serve.worker import PredictProcess

log = logging.getLogger("ctpipe.serve")
TICK = 0.5  # seconds between looks at the spool
EXPIRE_EVERY = 30.0  # seconds between retention passes


class Runner:
    def __init__(self, spool: Spool, cfg: ServeConfig, metrics: Metrics, audit: Audit) -> None:
        self.spool, self.cfg, self.metrics, self.audit = spool, cfg, metrics, audit
        self.records = cfg.records_path
        self.records.mkdir(parents=True, exist_ok=True, mode=0o700)
        reference = cfg.monitor.reference
        self.reference = (
            series_records.load_reference(reference)
            if reference is not None and reference.is_file()
            else None
        )
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.expired_at = 0.0
        self.processes: list[PredictProcess] = []

    def start(self) -> None:
        recovered = self.spool.recover()
        log.info("spool recovered: %s", recovered)
        self.metrics.queue_depth.set(self.spool.depth())
        loops = [self.schedule, self.deliver]
        loops += [self.worker_loop() for _ in range(self.cfg.workers)]
        self.run_loops(loops)

    def run_loops(self, loops: list) -> None:
        """Each loop in a thread of its own, until :meth:`shutdown`."""
        for i, loop in enumerate(loops):
            thread = threading.Thread(target=self._forever, args=(loop,), name=f"ctpipe-{i}")
            thread.daemon = True
            thread.start()
            self.threads.append(thread)

    def shutdown(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)
        for process in self.processes:
            process.stop()

    def _forever(self, step) -> None:
        while not self.stop.is_set():
            try:
                busy = step()
            except Exception as err:  # noqa: BLE001 - a loop never dies; the job records say why
                log.error("%s failed (%s); continuing", step.__name__, redact(repr(err)))
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

    def worker_loop(self):
        process = PredictProcess(self.cfg.predict_timeout_seconds)
        self.processes.append(process)

        def work() -> bool:
            return self.work(process)

        return work

    def work(self, process: PredictProcess) -> bool:
        record = self.spool.claim()
        if record is None:
            return False
        self.run_job(process, record)
        self.check_drift()
        return True

    def run_job(self, process: PredictProcess, record: dict) -> dict:
        """Predict a claimed (``running``) job and store its outcome in its record; return it.
        The SEG's and SR's UIDs derive from the job id and the model version, so that a job run
        again (a redelivered message, a restart) makes the same objects."""
        folder = self.spool.jobs / record["id"]
        shutil.rmtree(inside(self.spool.root, folder / "out"), ignore_errors=True)  # a run before
        start = time.perf_counter()
        try:
            summary = process.run(
                folder / "input",
                self.cfg.package,
                self.cfg.model,
                folder / "out",
                self.records,
                f"{record['id']}/{self.metrics.version}",
            )
            series = list(summary["series"].values())
            if summary["predicted"]:
                status, reason = "predicted", ""
            else:
                status = "failed" if any(s["status"] == "failed" for s in series) else "refused"
                reason = "; ".join(sorted({s.get("reason", "") for s in series})) or "no series"
        except Exception as err:  # noqa: BLE001 - the job fails with its reason, the server lives
            status, reason = "failed", str(err)
        seconds = time.perf_counter() - start
        sending = status == "predicted" and self.cfg.destination.kind != "none"
        now = time.time()
        record.update(
            status=status,
            reason=redact(reason),
            finished=now,
            inference_seconds=round(seconds, 3),
            send="pending" if sending else "none",
            done=None if sending else now,
        )
        self.spool.save(record)
        self.metrics.jobs.labels(status, self.metrics.version).inc()
        self.metrics.inference.labels(self.metrics.version).observe(seconds)
        log.info("job %s %s in %.1f s %s", record["id"], status, seconds, record["reason"])
        self.audit(
            "job",
            status,
            job=record["id"],
            study=record.get("study"),
            series=record.get("series"),
            model_version=self.metrics.version,
            reason=record["reason"] or None,
            seconds=round(seconds, 3),
        )
        return record

    def check_drift(self) -> None:
        """Drift of the newest records against the training reference, as Prometheus gauges."""
        if self.reference is None:
            return
        window = series_records.load(self.records, newest=self.cfg.monitor.window)
        if window:
            result = drift.compare(self.reference, window, self.cfg.monitor.alpha)
            self.metrics.update_drift(result, window[-1])

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: doubling, capped, with jitter so that many
        jobs failing together do not retry together."""
        retry = self.cfg.retry
        wait = min(retry.max_seconds, retry.first_seconds * 2 ** (attempts - 1))
        return wait * (1 - retry.jitter * random.random())

    def retain(self) -> bool:
        """The retention policy, at most every ``EXPIRE_EVERY`` seconds (a loop step that never
        counts as work: the queue does not change)."""
        now = time.time()
        if now - self.expired_at >= EXPIRE_EVERY:
            self.expire(now)
        return False

    def deliver(self) -> bool:
        self.retain()
        now = time.time()
        if self.cfg.destination.kind == "none":
            return False
        records = self.spool.records()
        self.metrics.send_failed.set(sum(r["send"] == "failed" for r in records))
        for record in records:
            due = record["send"] in ("pending", "retrying") and record["next_attempt"] <= now
            if record["status"] != "predicted" or not due:
                continue
            self.send_one(record)
            return True
        return False

    def send_one(self, record: dict) -> None:
        """One attempt to deliver a job's results; whatever goes wrong counts as an attempt."""
        record["attempts"] += 1
        dest = destination_name(self.cfg.destination)
        try:
            send(self.spool.results(record["id"]), self.cfg.destination, self.cfg.dicom.ae_title)
        except Exception as err:  # noqa: BLE001 - any failure is a failed attempt, never a wedge
            reason = redact(str(err) or type(err).__name__)
            if record["attempts"] >= self.cfg.retry.max_attempts:
                record.update(send="failed", send_error=reason, done=time.time())
                outcome = "failed"
            else:
                wait = self.backoff(record["attempts"])
                record.update(send="retrying", next_attempt=time.time() + wait, send_error=reason)
                outcome = "retrying"
            log.warning("job %s: send %s (%s)", record["id"], outcome, reason)
        else:
            record.update(send="sent", sent=time.time(), send_error="", done=time.time())
            outcome, reason = "sent", None
            log.info("job %s: results sent", record["id"])
        self.spool.save(record)
        self.metrics.sends.labels(outcome).inc()
        self.audit(
            "send",
            outcome,
            job=record["id"],
            destination=dest,
            attempt=record["attempts"],
            reason=reason,
        )

    def expire(self, now: float) -> None:
        """The retention policy: inputs after ``hold_hours``, whole jobs after ``jobs_days``."""
        self.expired_at = now
        keep = self.cfg.retention
        for job_id, what in self.spool.expire(keep.hold_hours * 3600, keep.jobs_days * 86400, now):
            self.audit("retention", "deleted", job=job_id, what=what)
        self.metrics.free_disk.set(self.spool.free_bytes())
