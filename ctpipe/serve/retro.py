"""A retrospective run over an archive through the workers' queue:
``python -m ctpipe.predict --queue URL ARCHIVE_DIR OUT_DIR``.

The command scans ARCHIVE_DIR as local predict does, publishes one ``predict`` message per series
(its files relative to ARCHIVE_DIR, and OUT_DIR: both on storage the workers share, under their
``queue.shared_roots``), and waits for one reply per series on a reply queue of its own (RabbitMQ's
RPC pattern: ``reply_to`` + ``correlation_id``). Workers predict into ``OUT_DIR/<series>/`` exactly
as local predict does (nothing is sent to a PACS); the command writes the same ``summary.json``
and exits with the same status (0: at least one series predicted, 2: none). If the broker
connection is lost, the series without a reply are published again: their outputs are replaced by
the same ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import uuid
from pathlib import Path

import pika
from pydantic import ValidationError

from ctpipe import dicomio
from ctpipe.deploy import predict as local
from ctpipe.fileio import read_json
from ctpipe.progress import progress
from ctpipe.safepath import UnsafePath, inside
from ctpipe.serve.broker import ERRORS, Delivery, Outcome, declare, names, parameters, publish
from ctpipe.serve.config import Queue, ServeConfig
from ctpipe.serve.telemetry import redact

log = logging.getLogger("predict")
RECONNECTS = 5  # lost connections to the broker before the command gives up


def under_roots(path: str, roots: list[Path], key: str) -> Path:
    """``path`` (absolute) resolved, when it is one of ``roots`` or inside one; else
    :class:`UnsafePath` naming ``key``."""
    resolved = Path(path).resolve() if os.path.isabs(path) else None
    for root in roots:
        base = root.resolve()
        if resolved is not None and (resolved == base or base in resolved.parents):
            return resolved
    raise UnsafePath(f"{key}: not an absolute path under queue.shared_roots")


def handle(message, delivery: Delivery, cfg: ServeConfig, process, version: str) -> Outcome:
    """A worker's answer to one ``predict`` message (:class:`ctpipe.serve.roles.PredictJob`):
    the series predicted into OUT/<series>/ and its summary entry as the reply."""
    files = len(message.files)
    try:
        archive = under_roots(message.archive, cfg.queue.shared_roots, "archive")
        out = under_roots(message.out, cfg.queue.shared_roots, "out")
        paths = [inside(archive, archive / name) for name in message.files]
    except UnsafePath as err:
        log.error("predict message refused: %s", redact(str(err)))
        if not delivery.reply_to:
            return Outcome(ack=False)  # to NAME.dead
        entry = {"status": "refused", "reason": f"refused by the worker: {err}", "files": files}
    else:
        seed = f"{message.series}/{version}"
        try:
            entry = process.call(
                "series", message.series, paths, cfg.package, cfg.model, out, None, seed
            )
        except Exception as err:  # noqa: BLE001 - a time limit, a crash: the series failed
            entry = {"status": "failed", "reason": str(err), "files": files}
    if not delivery.reply_to:
        return Outcome()
    body = {"series": message.series, "entry": entry, "model": cfg.model}
    return Outcome(publish=[(delivery.reply_to, body, {"correlation_id": delivery.correlation_id})])


def submit(queue: Queue, messages: dict[str, dict], bar) -> dict[str, dict]:
    """Publish ``messages`` (correlation id -> body) and collect one reply each: id -> reply."""
    replies: dict[str, dict] = {}
    for attempt in range(RECONNECTS + 1):
        connection = None
        try:
            connection = pika.BlockingConnection(parameters(queue))
            channel = connection.channel()
            declare(channel, queue.name)
            channel.confirm_delivery()
            reply_queue = channel.queue_declare("", exclusive=True).method.queue
            for cid, body in messages.items():
                if cid not in replies:
                    publish(channel, names(queue.name)["jobs"], body, reply_to=reply_queue,
                            correlation_id=cid)  # fmt: skip
            for method, props, raw in channel.consume(reply_queue, inactivity_timeout=1):
                if method is None:
                    continue
                channel.basic_ack(method.delivery_tag)
                if props.correlation_id in messages and props.correlation_id not in replies:
                    replies[props.correlation_id] = json.loads(raw)
                    bar.update(1)
                if len(replies) == len(messages):
                    return replies
        except ERRORS as err:
            log.warning("broker: %s (attempt %d)", type(err).__name__, attempt + 1)
            time.sleep(min(2**attempt, 30))
        finally:
            try:
                if connection is not None and connection.is_open:
                    connection.close()
            except ERRORS:
                pass
        if len(replies) == len(messages):
            break
    if len(replies) < len(messages):
        raise RuntimeError(f"{len(messages) - len(replies)} series without a reply from a worker")
    return replies


def run(args: argparse.Namespace) -> int:
    """``python -m ctpipe.predict --queue URL ARCHIVE_DIR OUT_DIR``: see the module docstring."""
    try:
        queue = Queue(
            kind="rabbitmq", url=args.queue, password_env=args.password_env, name=args.queue_name
        )
    except ValidationError as err:
        log.error("--queue: %s", "; ".join(e["msg"] for e in err.errors()))
        return 2
    if args.records is not None:
        log.error(
            "--records: not with --queue (the workers keep no records of a retrospective run)"
        )
        return 2
    archive, out = args.study_dir.resolve(), args.out_dir.resolve()
    spec_path = args.package / "input_spec.json"
    spec = read_json(spec_path) if spec_path.is_file() else {}
    modalities = tuple(spec.get("accepted_input", {}).get("modalities", ["CT"]))
    manifest = dicomio.scan_folder(archive, modalities=modalities)
    report, files = local.unused_files(manifest)
    series = dicomio.series_files(manifest)
    run_id = uuid.uuid4().hex
    messages = {
        f"{run_id}:{i}": {
            "kind": "predict",
            "archive": str(archive),
            "files": [str(p) for p in rel],
            "out": str(out),
            "series": uid,
        }
        for i, (uid, rel) in enumerate(series.items())
    }
    out.mkdir(parents=True, exist_ok=True)
    with progress(total=len(messages), desc="series", unit="series") as bar:
        replies = submit(queue, messages, bar) if messages else {}
    for reply in replies.values():
        report[reply["series"]] = reply["entry"]
    summary = local.write_summary(args.study_dir, args.model, report, files, args.out_dir)
    if not summary["predicted"]:
        log.error("%s: no series predicted (reasons in %s)", args.study_dir, out / "summary.json")
    return 0 if summary["predicted"] else 2
