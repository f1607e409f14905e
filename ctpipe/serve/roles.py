"""The node split in roles that share a spool folder and a RabbitMQ broker (docs/serving.md,
"Scaling out"): receivers turn complete series into jobs and publish one message each; workers
consume them, predict, store the results and send them.

At-least-once without duplicates: a job message is acknowledged only after the job's record says
``predicted`` (or refused, failed) and its outputs are in place; a worker that dies before that
leaves the message unacknowledged and the broker gives it to another worker, which predicts again
and writes the same SEG and SR (their UIDs derive from the job id and the model version). A
worker given a job whose results are already stored does not predict again: it goes on to the
send. The send is a message of its own, published before the job's acknowledgement; each send
message is one attempt, and a failed one waits in NAME.send.retry for its back-off.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ctpipe.serve.audit import Audit
from ctpipe.serve.broker import Consumer, Delivery, Outcome, Publisher, names
from ctpipe.serve.config import ServeConfig
from ctpipe.serve.runner import Runner
from ctpipe.serve.spool import JOB_ID, Spool
from ctpipe.serve.telemetry import Metrics, redact
from ctpipe.serve.worker import PredictProcess

log = logging.getLogger("ctpipe.serve")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServeJob(Message):
    kind: Literal["serve"]
    job: str = Field(pattern=JOB_ID.pattern)
    published: float = 0.0  # time.time() of the publisher: the broker's delay, measured


class PredictJob(Message):
    """One series of a retrospective run (:mod:`ctpipe.deploy.retro`)."""

    kind: Literal["predict"]
    archive: str  # absolute, on shared storage, under one of queue.shared_roots
    files: list[str] = Field(min_length=1)  # the series' files, relative to archive
    out: str  # absolute, under one of queue.shared_roots
    series: str  # SeriesInstanceUID: names OUT/<series>/, checked by predict


class SendJob(Message):
    kind: Literal["send"]
    job: str = Field(pattern=JOB_ID.pattern)


JOBS = TypeAdapter(Annotated[ServeJob | PredictJob, Field(discriminator="kind")])
SENDS = TypeAdapter(SendJob)


def rejected(what: str, err: Exception) -> Outcome:
    """A message no worker can use: to NAME.dead, with a log line (no message content)."""
    kind = type(err).__name__
    detail = f"{len(err.errors())} problem(s)" if isinstance(err, ValidationError) else str(err)
    log.error("%s message rejected (to the dead-letter queue): %s %s", what, kind, redact(detail))
    return Outcome(ack=False)


class ReceiverRunner(Runner):
    """The receiver's loops: complete series -> jobs -> one published message each, and the
    retention policy. A job made while the broker is away is published when it is back."""

    def __init__(self, spool: Spool, cfg: ServeConfig, metrics: Metrics, audit: Audit) -> None:
        super().__init__(spool, cfg, metrics, audit)
        self.publisher = Publisher(cfg.queue)
        self.queue_name = names(cfg.queue.name)["jobs"]
        self.unpublished: list[str] = []

    def start(self) -> None:
        log.info("spool recovered: %s", self.spool.recover(shared=True))
        # at least once: a job queued before a crash may not have reached the broker
        self.unpublished = [r["id"] for r in self.spool.records() if r["status"] == "queued"]
        self.metrics.queue_depth.set(self.spool.depth())
        self.run_loops([self.schedule, self.retain])

    def shutdown(self) -> None:
        super().shutdown()
        self.publisher.close()

    @property
    def broker_connected(self) -> bool:
        return self.publisher.connected

    def schedule(self) -> bool:
        made = [j for j in map(self.spool.make_job, self.spool.complete_series()) if j]
        for job_id in made:
            log.info("job %s queued", job_id)
        self.unpublished += made
        published = self.publish_queued() if self.publisher.ensure() else 0
        self.publisher.pump()
        return bool(made or published)

    def publish_queued(self) -> int:
        count = 0
        while self.unpublished:
            job_id = self.unpublished[0]
            message = {"kind": "serve", "job": job_id, "published": time.time()}
            try:
                self.publisher.publish(self.queue_name, message)
            except Exception as err:  # noqa: BLE001 - kept, published when the broker is back
                log.warning("job %s not published yet: %s", job_id, redact(str(err)))
                break
            self.unpublished.pop(0)
            log.info("job %s published", job_id)
            count += 1
        return count


class WorkerRunner(Runner):
    """A worker: one consumer of jobs (predict, one at a time) and one of sends."""

    def __init__(self, spool: Spool, cfg: ServeConfig, metrics: Metrics, audit: Audit) -> None:
        super().__init__(spool, cfg, metrics, audit)
        self.names = names(cfg.queue.name)
        self.process = PredictProcess(cfg.predict_timeout_seconds)
        self.processes.append(self.process)
        self.consumers = [Consumer(cfg.queue, self.names["jobs"], self.on_job)]
        if cfg.destination.kind != "none":
            self.consumers.append(Consumer(cfg.queue, self.names["send"], self.on_send))

    def start(self) -> None:
        for consumer in self.consumers:
            consumer.start()

    def shutdown(self) -> None:
        for consumer in self.consumers:
            consumer.shutdown()
        super().shutdown()

    @property
    def broker_connected(self) -> bool:
        return all(c.connected.is_set() for c in self.consumers)

    def send_message(self, job_id: str) -> tuple[str, dict, dict]:
        return (self.names["send"], {"kind": "send", "job": job_id}, {})

    def on_job(self, delivery: Delivery) -> Outcome:
        try:
            message = JOBS.validate_json(delivery.body)
        except ValidationError as err:
            return rejected("job", err)
        if isinstance(message, PredictJob):
            from ctpipe.serve.retro import handle

            return handle(message, delivery, self.cfg, self.process, self.metrics.version)
        if not (self.spool.jobs / message.job / "job.json").is_file():
            return rejected("job", FileNotFoundError("no such job in the spool"))
        action, record = self.spool.claim_job(message.job, delivery.redelivered)
        if action == "run":
            if message.published:
                record["queue_seconds"] = round(time.time() - message.published, 4)
            record = self.run_job(self.process, record)
            self.metrics.queue_depth.set(self.spool.depth())
            self.check_drift()
        elif action == "skip":
            log.info("job %s: %s, nothing to do", message.job, record.get("status"))
        if record.get("send") in ("pending", "retrying"):  # stored: the send goes on
            return Outcome(publish=[self.send_message(message.job)])
        return Outcome()

    def on_send(self, delivery: Delivery) -> Outcome:
        try:
            message = SENDS.validate_json(delivery.body)
            record = self.spool.load(message.job)
        except (ValidationError, OSError, json.JSONDecodeError) as err:
            return rejected("send", err)
        if record.get("status") != "predicted" or record.get("send") not in ("pending", "retrying"):
            return Outcome()  # sent or failed for good already (a message published twice)
        self.send_one(record)
        if record["send"] != "retrying":
            return Outcome()
        wait_ms = max(0, int((record["next_attempt"] - time.time()) * 1000))
        # per-message TTL: the message comes back to NAME.send when its back-off is over
        retry = {"expiration": str(wait_ms)}
        return Outcome(publish=[(self.names["retry"], {"kind": "send", "job": message.job}, retry)])
