"""The node's side of RabbitMQ (pika): the queues the roles share, a publisher with publisher
confirms, and a consumer thread that acknowledges a message only after its work is stored.

Queues (``queue.name`` is the prefix; all durable, messages persistent)::

    NAME             jobs: {"kind": "serve", "job": ID} from receivers, {"kind": "predict", ...}
                     from retrospective runs; consumed by workers, one at a time (prefetch 1)
    NAME.send        {"kind": "send", "job": ID}: one attempt to deliver a job's SEG and SR
    NAME.send.retry  failed sends wait here for their back-off (a per-message TTL), then are
                     dead-lettered back to NAME.send (RabbitMQ's delayed-retry pattern)
    NAME.dead        messages a worker rejected (not JSON, not a known kind, a path outside its
                     root), through the exchange NAME.dlx, kept for a person to look at

pika connections are not thread-safe: each :class:`Consumer` thread and each :class:`Publisher`
owner has a connection of its own. A lost connection is reopened with doubling waits; the
``connected`` event says whether the broker is reachable now (``/readyz``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

import pika
import pika.exceptions

from ctpipe.serve.config import Queue
from ctpipe.serve.telemetry import redact

log = logging.getLogger("ctpipe.serve")
FIRST_WAIT, MAX_WAIT = 0.5, 30.0  # seconds between reconnection attempts, doubling
PERSISTENT = 2  # delivery_mode: the broker writes the message to disk
ERRORS = (pika.exceptions.AMQPError, OSError)


class BrokerError(RuntimeError):
    """The broker did not take a message (unreachable, refused, not confirmed)."""


def parameters(queue: Queue) -> pika.ConnectionParameters:
    """Connection parameters of ``queue.url``; the password comes from the environment
    (``queue.password_env``), never from the URL or the config file."""
    url = urlsplit(str(queue.url))
    user = unquote(url.username or "guest")
    password = os.environ.get(queue.password_env, "") if queue.password_env else "guest"
    netloc = url.hostname + (f":{url.port}" if url.port else "")
    params = pika.URLParameters(urlunsplit((url.scheme, netloc, url.path or "/", url.query, "")))
    params.credentials = pika.PlainCredentials(user, password)
    params.connection_attempts, params.socket_timeout = 1, 5
    params.blocked_connection_timeout = 30  # a broker out of disk blocks publishers: give up
    return params


def where(queue: Queue) -> str:
    """The broker as logs name it (no credentials)."""
    url = urlsplit(str(queue.url))
    return f"{url.scheme}://{url.hostname}:{url.port or ''}"


def names(prefix: str) -> dict[str, str]:
    return {
        "jobs": prefix,
        "send": f"{prefix}.send",
        "retry": f"{prefix}.send.retry",
        "dead": f"{prefix}.dead",
        "dlx": f"{prefix}.dlx",
    }


def declare(channel, prefix: str) -> None:
    """The queues of the module docstring (idempotent: every connection declares them)."""
    n = names(prefix)
    channel.exchange_declare(n["dlx"], "fanout", durable=True)
    channel.queue_declare(n["dead"], durable=True)
    channel.queue_bind(n["dead"], n["dlx"])
    dead_letter = {"x-dead-letter-exchange": n["dlx"]}
    channel.queue_declare(n["jobs"], durable=True, arguments=dead_letter)
    channel.queue_declare(n["send"], durable=True, arguments=dead_letter)
    back = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": n["send"]}
    channel.queue_declare(n["retry"], durable=True, arguments=back)


def publish(channel, routing_key: str, body: dict, **props) -> None:
    """One persistent JSON message, confirmed by the broker (the channel is in confirm mode;
    ``mandatory``: a message no queue takes raises instead of vanishing)."""
    channel.basic_publish(
        "",
        routing_key,
        json.dumps(body).encode(),
        pika.BasicProperties(content_type="application/json", delivery_mode=PERSISTENT, **props),
        mandatory=True,
    )


class Publisher:
    """Publishes from one thread (its owner) over a connection of its own, opened when needed."""

    def __init__(self, queue: Queue) -> None:
        self.queue, self.params = queue, parameters(queue)
        self.connection = self.channel = None
        self.next_try, self.wait = 0.0, FIRST_WAIT

    def ensure(self) -> bool:
        """Connected, or an attempt to connect now and then (doubling waits): whether it is."""
        if self.connected:
            return True
        if time.time() >= self.next_try:
            try:
                self._open()
                self.wait = FIRST_WAIT
                log.info("publishing to %s", where(self.queue))
            except ERRORS as err:
                self.close()
                log.warning("broker %s: %s", where(self.queue), type(err).__name__)
                self.next_try, self.wait = time.time() + self.wait, min(self.wait * 2, MAX_WAIT)
        return self.connected

    def _open(self) -> None:
        self.connection = pika.BlockingConnection(self.params)
        self.channel = self.connection.channel()
        declare(self.channel, self.queue.name)
        self.channel.confirm_delivery()

    def publish(self, routing_key: str, body: dict, **props) -> None:
        """Publish and wait for the broker's confirm, or raise :class:`BrokerError`."""
        for attempt in (1, 2):  # a connection closed while idle (heartbeat) is opened again once
            try:
                if self.connection is None or not self.connection.is_open:
                    self._open()
                publish(self.channel, routing_key, body, **props)
                return
            except ERRORS as err:
                self.close()
                if attempt == 2:
                    reason = redact(repr(err) or type(err).__name__)
                    raise BrokerError(f"{where(self.queue)}: {reason}") from None

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.connection.is_open

    def pump(self) -> None:
        """Answer the broker's heartbeats while idle (call now and then from the owner)."""
        if self.connected:
            try:
                self.connection.process_data_events(0)
            except ERRORS:
                self.close()

    def close(self) -> None:
        try:
            if self.connection is not None and self.connection.is_open:
                self.connection.close()
        except ERRORS:
            pass
        self.connection = self.channel = None


@dataclass
class Delivery:
    body: bytes
    redelivered: bool
    reply_to: str | None
    correlation_id: str | None


@dataclass
class Outcome:
    """What the consumer does with a message once the handler returns: publish ``publish``
    (routing key, body, properties), then acknowledge it (``ack``) or reject it to NAME.dead."""

    ack: bool = True
    publish: list[tuple[str, dict, dict]] = field(default_factory=list)
    requeue: bool = False  # not acknowledged: back to the queue (a transient failure)


class Consumer(threading.Thread):
    """Consumes ``routing_key`` one message at a time (``basic_qos(prefetch_count=1)``): the
    handler runs in a helper thread while this one keeps the connection alive (heartbeats), then
    this thread publishes what the handler asks and acknowledges the message. A message whose
    work was not stored is never acknowledged: if the worker dies, the broker redelivers it."""

    def __init__(
        self, queue: Queue, routing_key: str, handler: Callable[[Delivery], Outcome]
    ) -> None:
        super().__init__(name=f"consume-{routing_key}", daemon=True)
        self.queue, self.routing_key, self.handler = queue, routing_key, handler
        self.params = parameters(queue)
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.helper = ThreadPoolExecutor(1, thread_name_prefix=f"handle-{routing_key}")

    def run(self) -> None:
        wait = FIRST_WAIT
        while not self.stop.is_set():
            connection = None
            try:
                connection = pika.BlockingConnection(self.params)
                channel = connection.channel()
                declare(channel, self.queue.name)
                channel.confirm_delivery()
                channel.basic_qos(prefetch_count=1)
                self.connected.set()
                log.info("consuming %s from %s", self.routing_key, where(self.queue))
                wait = FIRST_WAIT
                for method, props, body in channel.consume(
                    self.routing_key, inactivity_timeout=0.5
                ):
                    if self.stop.is_set():
                        break
                    if method is not None:
                        self._one(connection, channel, method, props, body)
            except ERRORS as err:
                log.warning(
                    "broker %s: %s; again in %.1f s", where(self.queue), type(err).__name__, wait
                )
            finally:
                self.connected.clear()
                try:
                    if connection is not None and connection.is_open:
                        connection.close()
                except ERRORS:
                    pass
            self.stop.wait(wait)
            wait = min(wait * 2, MAX_WAIT)

    def _one(self, connection, channel, method, props, body: bytes) -> None:
        delivery = Delivery(body, bool(method.redelivered), props.reply_to, props.correlation_id)
        done = self.helper.submit(self._handle, delivery)
        while not done.done():
            connection.process_data_events(time_limit=0.2)  # heartbeats during a long predict
        outcome = done.result()
        for routing_key, message, extra in outcome.publish:
            try:
                publish(channel, routing_key, message, **extra)
            except pika.exceptions.UnroutableError:  # e.g. a reply queue whose client left
                log.warning("a message to %s had no queue to go to", routing_key[:40])
        if outcome.ack:
            channel.basic_ack(method.delivery_tag)
        elif outcome.requeue:
            channel.basic_nack(method.delivery_tag, requeue=True)
        else:
            channel.basic_reject(method.delivery_tag, requeue=False)  # to NAME.dead

    def _handle(self, delivery: Delivery) -> Outcome:
        try:
            return self.handler(delivery)
        except Exception as err:  # noqa: BLE001 - a bad message must not end the consumer
            # once more (a shared file system's hiccup), then to NAME.dead: never a loop
            again = not delivery.redelivered
            log.error(
                "message on %s %s: %s",
                self.routing_key,
                "requeued" if again else "rejected",
                redact(repr(err)),
            )
            return Outcome(ack=False, requeue=again)

    def shutdown(self, seconds: float = 10) -> None:
        self.stop.set()
        self.join(seconds)
        self.helper.shutdown(wait=False)


def wait_connected(consumers: list[Consumer], seconds: float) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if all(c.connected.is_set() for c in consumers):
            return True
        time.sleep(0.1)
    return False
