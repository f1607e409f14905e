"""Worker processes started before a stage imports its heavy modules.

A worker forked from a process that has imported pandas and pydicom shares that whole heap with
it: every page either process then writes, if only to count a reference, is copied on a page
fault. On the anonymize benchmark that was about 7,000 faults per run, split between this process
and its worker, and a second worker added 1.5x instead of 1.6x. Forked first, from a process that
has imported little, each worker imports what it needs itself, in parallel with this process's
own imports, and neither process copies the other's pages later.

The cost stays in the stage's figures: :attr:`Started.seconds` and :attr:`Started.cpu` (forking,
in this process) belong to the work; a worker's imports are start-up, as this process's own are,
so the CPU time it reports (:func:`work_cpu`) leaves them out.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.pool import Pool
from multiprocessing.process import BaseProcess

_startup_cpu = 0.0  # in a started worker: the CPU seconds it spent starting (its imports)


@dataclass
class Started:
    """A pool of ``processes`` workers that have imported their module (or are doing so)."""

    pool: Pool
    processes: int
    seconds: float  # wall seconds this process spent starting them
    cpu: float  # CPU seconds this process spent starting them
    children: list[BaseProcess]  # the worker processes the pool started (a dead one stays listed)

    def stop(self) -> None:
        """Terminate and reap the workers."""
        self.pool.terminate()
        self.pool.join()


def start(processes: int, module: str, init: str) -> Started | None:
    """``processes`` forked workers that import ``module`` and call its function ``init`` before
    taking tasks; None for none. Call it before importing what the workers will run."""
    if processes < 1:
        return None
    wall, cpu = time.perf_counter(), cpu_seconds()
    pool, children = new_pool(processes, _ready, (module, init))
    return Started(pool, processes, time.perf_counter() - wall, cpu_seconds() - cpu, children)


def new_pool(processes: int, *initializer) -> tuple[Pool, list[BaseProcess]]:
    """A forked ``Pool(processes, *initializer)`` and the worker processes it started.

    The pool replaces a worker that dies, but the task the worker held is lost: its result never
    comes, and whoever waits for it waits forever. Kept here, the processes tell a death
    (:func:`died`) to whoever waits."""
    before = set(multiprocessing.active_children())
    pool = multiprocessing.get_context("fork").Pool(processes, *initializer)
    return pool, [p for p in multiprocessing.active_children() if p not in before]


def died(children: list[BaseProcess]) -> str | None:
    """How the first of ``children`` that died did (killed by a signal, or an exit code other
    than 0); None while each is alive or has exited cleanly (a closed pool's workers exit 0)."""
    for child in children:
        code = child.exitcode
        if code is None or code == 0:
            continue
        try:
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        except ValueError:
            how = f"killed by signal {-code}"
        return f"worker process {child.pid} died ({how})"
    return None


def work_cpu() -> float:
    """CPU seconds of this process, without a started worker's start-up (a process forked
    otherwise counts from its fork)."""
    return cpu_seconds() - _startup_cpu


def _ready(module: str, init: str) -> None:
    global _startup_cpu
    getattr(importlib.import_module(module), init)()
    _startup_cpu = cpu_seconds()


def cpu_seconds() -> float:
    """CPU seconds of this process (a worker's are its own: it reports them, :func:`work_cpu`)."""
    return sum(os.times()[:2])  # user, system
