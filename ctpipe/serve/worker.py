"""Predict in a child process of its own, started once and reused, so that a job past its time
limit (``predict_timeout_seconds``) is killed without taking the node with it."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import warnings
from pathlib import Path

log = logging.getLogger("ctpipe.serve")
PR_SET_PDEATHSIG = 1  # prctl(2)


class PredictTimeout(RuntimeError):
    """The job ran past its time limit; its process was killed."""


class PredictProcess:
    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        # spawn, not fork: the node has threads (listeners, loops) that a fork would copy mid-step
        self.ctx = multiprocessing.get_context("spawn")
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        parent, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_child, args=(child, os.getpid()), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def run(
        self,
        study: Path,
        package: Path,
        model: str,
        out: Path,
        records: Path | None,
        uid_seed: str | None = None,
    ) -> dict:
        """predict_study's summary, or an exception with the reason (no UID in it)."""
        return self.call("study", study, package, model, out, records, uid_seed)

    def call(self, what: str, *args) -> dict:
        """``what`` (``study``: predict_study, ``series``: predict_entry) with ``args`` in the
        child process: its answer, or an exception with the reason."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((what, args))
        if not self.conn.poll(self.timeout):
            self.stop()
            raise PredictTimeout(f"predict ran past predict_timeout_seconds ({self.timeout:g} s)")
        try:
            ok, value = self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.exitcode if self.proc is not None else None
            self.stop()
            raise RuntimeError(f"predict process ended (exit code {code})") from None
        if not ok:
            raise RuntimeError(value)
        return value

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(10)
            self.conn.close()
        self.proc = self.conn = None


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process when the node dies (even by SIGKILL), so no orphan
    goes on writing into a job that the restarted node runs again. ``parent`` is the node's
    process id (in a container the node is PID 1, so "adopted by PID 1" would be wrong)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # another libc: the pipe's EOF ends the loop instead
        return
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def _child(conn, parent: int) -> None:
    _die_with_parent(parent)
    # predict logs series UIDs and file names, and pydicom's warnings quote header values: the
    # node's log must carry neither, so this process logs nothing; its results say what happened.
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    # Nor does it write anything else to the node's stderr (progress bars, ONNX Runtime's own
    # messages): each would be a line of another format among the node's (log_format: json).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    from ctpipe.deploy.predict import predict_entry, predict_study

    calls = {"study": predict_study, "series": predict_entry}
    while True:
        try:
            what, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send((True, calls[what](*args)))
        except Exception as err:  # noqa: BLE001 - the job fails with its reason, the process lives
            conn.send((False, f"{type(err).__name__}: {err}"))
