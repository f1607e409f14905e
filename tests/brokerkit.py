"""A real RabbitMQ broker for the tests: Debian's ``rabbitmq-server`` started as a plain process
on free localhost ports, with its data, logs, config and Erlang cookie in a temporary folder and
its own ``epmd`` port, so that it clashes neither with a system broker nor with another test run.
The management plugin stays off (it is slow to start and not needed). ``.ci/run`` installs the
package; elsewhere the tests that need it are skipped (``apt-get install -y rabbitmq-server``)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
DIAGNOSTICS = Path("/usr/lib/rabbitmq/bin/rabbitmq-diagnostics")
INSTALL = "apt-get install -y rabbitmq-server"
START_SECONDS = 120  # a cold Erlang VM on a busy 2-core machine


def available() -> bool:
    return SERVER.is_file() and shutil.which("erl") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """One RabbitMQ node; :meth:`stop` and :meth:`start` again keep its durable queues."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.node = f"ctpipe-test-{self.port}@localhost"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        # loopback_users = none: the guest account works on 127.0.0.1 only anyway (the listener)
        (folder / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (folder / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest@127.0.0.1:{self.port}/%2F"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.folder),  # the Erlang cookie
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),  # not /etc's
            "RABBITMQ_PID_FILE": str(self.folder / "rabbitmq.pid"),
        }

    def start(self) -> Broker:
        log = open(self.folder / "server.out", "ab")
        self.proc = subprocess.Popen(
            [str(SERVER)], env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its Erlang children are stopped with it, as one group
        )  # fmt: skip
        end = time.time() + START_SECONDS
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server ended: see {self.folder / 'server.out'}")
            if self.answers():
                return self
            time.sleep(0.5)
        raise RuntimeError(f"rabbitmq-server not up in {START_SECONDS} s: {self.folder}")

    def answers(self) -> bool:
        """An AMQP connection opens (the broker is up and its listener takes clients)."""
        import pika

        logging.getLogger("pika").setLevel(logging.CRITICAL)  # refused while it starts: expected
        params = pika.ConnectionParameters(
            "127.0.0.1", self.port, connection_attempts=1, socket_timeout=2
        )  # guest:guest, pika's default
        try:
            pika.BlockingConnection(params).close()
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        """Stop the broker and the ``epmd`` its Erlang VM started on our port."""
        self.stop()
        subprocess.run(
            ["epmd", "-port", str(self.epmd_port), "-kill"],
            env=self.env(),
            capture_output=True,
            timeout=10,
        )
