"""Many files at once: de-identification and the leak scan in worker processes.

The worker processes are started once for a run (:class:`Workers`) and take the files in chunks,
each with what its function needs (a :class:`DeidJob` or :class:`ScanJob`). Two passes:

1. Every input is read once: the person names it holds are collected, and it is de-identified
   and written. A kept descriptor must also lose every name seen anywhere in the cohort
   (:mod:`ctpipe.deid.freetext`), known only once every file has been read: a file whose
   scrubbed descriptors hold a word that may be one of those names, not already removed by the
   file's own values, is de-identified again with them (:meth:`freetext.Terms.may_change`);
   in an ordinary cohort, none or a few.
2. Every output is read back and scanned for the identifying values collected from the inputs,
   for the free-text patterns and for the cohort's names (:mod:`ctpipe.deid.verify`).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import multiprocessing
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import config

from ctpipe import prefork
from ctpipe.deid.engine import Deidentifier
from ctpipe.deid.files import FileResult, process_file
from ctpipe.deid.freetext import Terms
from ctpipe.deid.keys import Keyring
from ctpipe.deid.names import names_of_file
from ctpipe.deid.table import DeidOptions, Profile
from ctpipe.deid.verify import (
    FreeTextCheck,
    NeedleIndex,
    name_index,
    scan_file,
    scan_text,
)
from ctpipe.prefork import Started
from ctpipe.progress import progress

_WORKER: dict = {}  # per-process state: the de-identifier of the last DeidJob
GUIDED = 2  # a chunk is the remaining files over this many times the workers
MIN_CHUNK = 8  # files handed to a worker at a time, at least (fewer round trips on small files)
AHEAD = 2  # chunks sent to a forked worker before it asks: one to run, one waiting
SWITCH_INTERVAL = 0.0005  # seconds a thread may hold the GIL while the pool's threads wait
LEAK_MIN_CHARS = 4  # identifying values shorter than this are not searched for ("M", "CT")
DEATH_POLL = 0.5  # seconds between checks, while this process waits, that no forked worker died
log = logging.getLogger("ctpipe.deid.batch")


class WorkerDied(RuntimeError):
    """A forked worker died (killed, crashed) holding items of a pass or a call: they are lost,
    and so is the pass. ``lost``: the items the forked workers held (one of them the dead one's).
    The message gives their number only: an input's path may name the patient."""

    def __init__(self, message: str, lost: list | None = None) -> None:
        super().__init__(message)
        self.lost = lost or []


def quiet_pydicom() -> None:
    """pydicom's value warnings quote the values (PHI): keep them out of logs and consoles."""
    config.settings.reading_validation_mode = config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pydicom")


class Workers:
    """The worker processes of a run, started once for every pass. This process is one of the
    ``workers``: it forks the others and, while it waits for a pass, takes chunks as they do
    (1 worker: this process alone).

    Files go out in chunks that shrink as the work runs out (guided scheduling, :class:`_Pass`).
    The first chunks are large, so that a worker keeps a patient's files together (its caches)
    and round trips stay few; the last are small, so that the workers finish together.

    ``started``: the other workers, started before this module was imported
    (:func:`ctpipe.prefork.start`, for ``quiet_pydicom`` of this module), so that they share no
    heap with this process; else they are forked here.
    """

    def __init__(
        self, workers: int, chunksize: int = MIN_CHUNK, started: Started | None = None
    ) -> None:
        self.workers, self.chunksize = max(1, workers), max(1, chunksize)
        self.started = started if started and started.processes == self.workers - 1 else None
        self.pool = None
        self.children: list = []  # the forked workers (prefork.new_pool)
        self.closed = False  # the last pass has begun
        self.cpu: dict[int, float] = {}  # CPU seconds each forked worker reported, by process

    def __enter__(self) -> Workers:
        quiet_pydicom()
        _WORKER.clear()  # a run starts with fresh caches (what was reported kept, per patient)
        if self.started is not None:
            self.pool, self.children = self.started.pool, self.started.children
        elif self.workers > 1:
            # A worker's first full garbage collection would walk, and so copy, every object it
            # inherits (70 ms stalls): objects that exist now stay out of its collections.
            gc.freeze()
            self.pool, self.children = prefork.new_pool(self.workers - 1, quiet_pydicom)
            gc.unfreeze()
        if self.pool is not None:
            # The pool's threads send chunks and take results back; while this thread works
            # they wait for the GIL up to the switch interval (5 ms), and so do the workers.
            self.interval = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL)
        return self

    def __exit__(self, error_type, *exc) -> None:
        if self.pool is None:
            return
        sys.setswitchinterval(self.interval)
        if self.started is not None and error_type is None:
            self.pool.close()  # they exit once done; their owner reaps them (Started.stop)
        else:
            self.pool.terminate()
            self.pool.join()

    def worker_cpu(self) -> float:
        """CPU seconds of the forked workers' work, as they last reported it with a result."""
        return sum(self.cpu.values())

    def call(self, func: Callable, *args) -> Callable[[], Any]:
        """``func(*args)`` in a forked worker while this process goes on (here and now when
        there is none); call the result for its value or its exception."""
        if self.pool is None:
            try:
                value = func(*args)
            except Exception as error:  # raised where the value is asked for, as a worker's is
                return functools.partial(_raise, error)
            return lambda: value
        pending = self.pool.apply_async(_reporting, (func, *args), callback=self._report)

        def value():
            while True:
                try:
                    return pending.get(DEATH_POLL)[2]
                except multiprocessing.TimeoutError:
                    if death := prefork.died(self.children):
                        raise WorkerDied(f"{death} during {func.__name__}") from None

        return value

    def _report(self, result: tuple) -> None:  # the pool's result thread
        self.cpu[result[0]] = result[1]

    def map(self, func: Callable, items: list, desc: str, job_of: Callable = lambda c: None):
        """``func(job_of(chunk), item)`` for every item, in any order."""
        return self.start(func, items, desc, job_of)()

    def start(
        self,
        func: Callable,
        items: list,
        desc: str,
        job_of: Callable = lambda c: None,
        last: bool = False,
    ) -> Callable[[], list]:
        """:meth:`map` begun in the forked workers; call the result to take part and wait.
        ``last``: no pass follows, so the forked workers exit as soon as their last chunk is
        done (their exit overlaps this process's last chunks, not the stop)."""
        if self.closed:
            raise RuntimeError("a pass after the last pass of these workers")
        self.closed = last
        return _Pass(self, func, items, job_of, desc, last).results


class _Pass:
    """The items of one pass, cut into chunks as they are taken: the remaining items over
    :data:`GUIDED` times the workers. The forked workers are kept :data:`AHEAD` chunks ahead (a
    chunk they finish sends the next), each sized on what will be left once they reach it, at
    least the pool's ``chunksize`` (round trips) and at most a worker's share of what is left;
    near the end, one chunk ahead only. This process's own chunks cost no round trip and shrink
    to one item, so that no chunk queued in a worker keeps the others waiting at the end. A pass
    no larger than one chunk runs here alone."""

    def __init__(
        self, workers: Workers, func: Callable, items: list, job_of, desc: str, last: bool
    ) -> None:
        self.owner, self.pool, self.func, self.items = workers, workers.pool, func, items
        self.job_of = job_of
        self.workers, self.smallest, self.desc = workers.workers, workers.chunksize, desc
        self.forked = self.workers - 1 if len(items) > self.smallest else 0
        self.last = last and self.pool is not None
        self.lock = threading.Condition()
        self.taken = 0  # items handed out
        self.queued = 0  # items sent to the forked workers and not back
        self.sent: dict[int, list] = {}  # those items, by chunk number
        self.numbered = 0  # chunks sent so far
        self.done: list = []
        self.pending, self.error = 0, None
        for _ in range(AHEAD * self.forked):
            self._send()

    def _take(self, forked: bool = False) -> tuple | None:
        """The next chunk (None: none left, none worth queueing in a forked worker, or the pass
        failed). A forked worker's chunk is counted as pending in the same step, so that
        results() never sees a chunk neither taken nor pending."""
        with self.lock:
            left = len(self.items) - self.taken
            if left <= 0 or self.error is not None:
                return None
            if forked:  # the forked workers reach this chunk once their queued items are done
                left -= self.queued / self.forked
                if self.queued and left < 2 * self.smallest:
                    return None  # near the end, one chunk each: this process takes the rest
            smallest = self.smallest if forked or not self.forked else 1
            size = max(smallest, math.ceil(left / (GUIDED * self.workers)))
            if forked:  # never more than a worker's share of what is left
                size = min(size, max(1, math.ceil(left / self.workers)))
            chunk = self.items[self.taken : self.taken + size]
            self.taken += len(chunk)
            if forked:
                self.pending, self.queued = self.pending + 1, self.queued + len(chunk)
            else:
                self._close_when_all_out()
        return self.func, self.job_of(chunk), chunk

    def _close_when_all_out(self) -> None:
        """In the last pass, once every chunk is out (a forked worker's: sent), the forked
        workers may exit after theirs. Called holding the lock."""
        if self.last and self.taken == len(self.items):
            self.pool.close()

    def _send(self) -> None:
        with self.lock:  # taken and sent in one step, so that the pool is closed after the send
            task = self._take(forked=True)
            if task is None:
                return
            number, self.numbered = self.numbered, self.numbered + 1
            try:
                self.pool.apply_async(
                    _reporting,
                    (_chunk, task),
                    callback=functools.partial(self._back, number),
                    error_callback=self._fail,
                )
            except ValueError as error:  # the pool is closing: the pass fails, nothing is lost
                self.pending -= 1
                self.error = self.error or error
                self.lock.notify_all()
                return
            self.sent[number] = task[2]
            self._close_when_all_out()

    def _back(self, number: int, reported: tuple) -> None:  # the pool's result thread
        self.owner._report(reported)
        result = reported[2]
        with self.lock:
            self.sent.pop(number, None)
            self.done.append(result)
            self.pending, self.queued = self.pending - 1, self.queued - len(result)
            self.lock.notify_all()
        self._send()

    def _fail(self, error: BaseException) -> None:
        with self.lock:
            self.error, self.pending = error, self.pending - 1
            self.lock.notify_all()

    def results(self) -> list:
        out: list = []
        with progress(total=len(self.items), desc=self.desc, unit="file") as bar:
            try:
                while (task := self._take()) is not None:
                    mine = _chunk(task)
                    out += mine
                    bar.update(len(mine))
            except BaseException as error:  # no more chunks go out: the pool is closed next
                with self.lock:
                    self.error = self.error or error
                raise
            with self.lock:
                while self.pending and self.error is None:
                    if not self.lock.wait(DEATH_POLL):
                        self.error = self._death()
                if self.error is not None:
                    raise self.error
                theirs = [r for chunk in self.done for r in chunk]
            bar.update(len(theirs))
        return out + theirs

    def _death(self) -> WorkerDied | None:
        """A forked worker's death, with what of the pass it may have held (lock held)."""
        death = prefork.died(self.owner.children)
        if death is None:
            return None
        lost = [item for chunk in self.sent.values() for item in chunk]
        return WorkerDied(f"{self.desc}: {death}; {len(lost)} items in the workers not done", lost)


def _chunk(task: tuple) -> list:
    func, job, items = task
    return [func(job, item) for item in items]


def _reporting(func: Callable, *args) -> tuple[int, float, Any]:
    """In a forked worker: its process id, its CPU seconds so far and ``func(*args)``."""
    value = func(*args)
    return os.getpid(), prefork.work_cpu(), value


def _raise(error: BaseException) -> None:
    raise error


def cohort_names(items: list[tuple[str, str]], workers: int, chunksize: int) -> set[str]:
    """Components of every person name in every input file, without de-identifying them (the
    de-identification pass collects them as it reads the files: :func:`deidentify`)."""
    with Workers(workers, chunksize) as pool:
        found = pool.map(names_one, items, "names")
    return set().union(*found) if found else set()


def names_one(job: None, item: tuple[str, str]) -> set[str]:
    return names_of_file(Path(item[0]))


@dataclass(frozen=True)
class DeidJob:
    """What a worker needs to de-identify files (the de-identifier is made once per job)."""

    options: dict
    key: bytes
    date_shift_days: tuple[int, int]
    out_dir: Path
    burned_in_missing_ok: frozenset[str]
    keep_linkage: bool
    names: frozenset[str] = frozenset()

    @classmethod
    def from_params(cls, options: DeidOptions, key: bytes, cfg, out_dir: Path) -> DeidJob:
        """From the ``anonymize`` section (:class:`ctpipe.config.Anonymize`)."""
        lo, hi = cfg.date_shift_days
        return cls(
            options.as_dict(),
            key,
            (lo, hi),
            out_dir,
            frozenset(m.upper() for m in cfg.burned_in_missing_ok),
            cfg.keep_linkage,
        )


def deid_file(job: DeidJob, item: tuple[str, str]) -> FileResult:
    if _WORKER.get("job") != job:
        options = DeidOptions(**job.options)
        deid = Deidentifier(options, Keyring(job.key), job.date_shift_days, job.names)
        _WORKER.update(job=job, deid=deid)
    return process_file(
        Path(item[0]),
        item[1],
        _WORKER["deid"],
        job.out_dir,
        job.burned_in_missing_ok,
        job.keep_linkage,
    )


def deidentify(
    items: list[tuple[str, str]], job: DeidJob, pool: Workers
) -> tuple[list[FileResult], frozenset[str], Callable[[], list[FileResult]]]:
    """Every input de-identified and written, sorted by input path; the cohort's name
    components; and the final results, once the files to de-identify again (a duplicate's first,
    or one that may hold a name of the cohort) are done: call it. When they are no more than a
    chunk, one forked worker does them while this process goes on (it builds the leak gate's
    indexes); more take a pass of every worker."""
    results = pool.map(deid_file, items, "anonymize", lambda chunk: job)
    results.sort(key=lambda r: r.rel)
    names = frozenset(set().union(*(r.names for r in results)))
    cohort = Terms(names)
    again = dedupe(results) | {
        r.rel for r in results if r.out_rel and cohort.may_change(r.words, r.removed, r.pairs)
    }
    if not again:
        return results, names, lambda: results
    log.info("%d files de-identified again (a duplicate, or names of the cohort)", len(again))
    redo = [item for item in items if item[1] in again]
    with_names = dataclasses.replace(job, names=names)
    if len(redo) > pool.chunksize:
        done = pool.map(deid_file, redo, "names", lambda chunk: with_names)
        return results, names, lambda: _replaced(results, done)
    pending = pool.call(deid_files, with_names, redo)
    return results, names, lambda: _replaced(results, pending())


def deid_files(job: DeidJob, items: list[tuple[str, str]]) -> list[FileResult]:
    return [deid_file(job, item) for item in items]


def _replaced(results: list[FileResult], again: list[FileResult]) -> list[FileResult]:
    by_rel = {r.rel: r for r in again}
    return [by_rel.get(r.rel, r) for r in results]


def dedupe(results: list[FileResult]) -> set[str]:
    """Inputs sharing one SOP Instance UID: the first (by path) wins and is written again (the
    inputs returned), so the output does not depend on which worker finished last; the others
    are quarantined."""
    first: dict[str, FileResult] = {}
    rewrite: set[str] = set()
    for r in results:
        if r.out_rel in first:
            rewrite.add(first[r.out_rel].rel)
            r.reason, r.detail, r.out_rel = "duplicate_sop_instance", "same SOPInstanceUID", ""
        elif r.out_rel:
            first[r.out_rel] = r
    return rewrite


@dataclass
class ScanJob:
    """What a worker needs to scan written files (the needles of the chunk's patients only)."""

    out_dir: Path
    per_patient: dict[str, NeedleIndex]
    cross: NeedleIndex
    free_text: FreeTextCheck = field(default_factory=FreeTextCheck)


def scan_one(job: ScanJob, item: tuple[str, str]) -> tuple[str, list[str]]:
    out_rel, patient = item
    indexes = [job.per_patient.get(patient, NeedleIndex()), job.cross]
    return out_rel, scan_file(job.out_dir / out_rel, indexes, job.free_text)


def global_index(per_patient: dict[str, NeedleIndex], cross: NeedleIndex) -> NeedleIndex:
    """Needles for names and tables shared by all patients: all text and UID-like values."""
    index = NeedleIndex(cross.text and set().union(*cross.text.values()))
    for patient in per_patient.values():
        for tuples in patient.text.values():
            for n in tuples:
                index.add(n)
        for n in patient.exact:
            if n.count(".") >= 2:
                index.add(n)
    return index


class Verification:
    """The leak gate over a run's outputs: every written DICOM file scanned by the workers from
    the start, for the identifying values of the inputs and, in free text, for the patterns and
    the cohort's ``names``; the other outputs (tables, file names) when :meth:`leaks` is called,
    once they are written."""

    def __init__(
        self,
        out_dir: Path,
        results: list[FileResult],
        indexes: tuple[dict[str, NeedleIndex], NeedleIndex],
        options: DeidOptions,
        names: frozenset[str],
        pool: Workers,
    ) -> None:
        min_chars = LEAK_MIN_CHARS
        per_patient, cross = indexes  # build_indexes(evidence of every input, LEAK_MIN_CHARS)
        self.shared = functools.partial(global_index, per_patient, cross)  # once the scans run
        tags = frozenset(Profile(options).descriptive)
        free_text = FreeTextCheck(tags, name_index(names, min_chars))
        items = [(r.out_rel, r.patient) for r in results if r.out_rel.startswith("dicom/")]

        def job_of(chunk: list[tuple[str, str]]) -> ScanJob:
            mine = {patient: per_patient[patient] for _, patient in chunk if patient in per_patient}
            return ScanJob(out_dir, mine, cross, free_text)

        self.out_dir, self.results = out_dir, results
        self.scanned = pool.start(scan_one, items, "verify", job_of, last=True)

    def leaks(self, extra_files: list[Path]) -> list[tuple[str, str]]:
        """(file, finding) pairs: in ``extra_files`` (mhd headers, CSVs, JSON), in the output
        file names, and in the DICOM files."""
        leaks, shared = [], self.shared()
        for path in extra_files:
            text = path.read_text(encoding="latin-1")
            cells = text.replace(",", "\n").replace('"', "\n").splitlines()
            rel = str(path.relative_to(self.out_dir))
            leaks += [(rel, f) for f in scan_text(cells, [shared])]
        names = [part for r in self.results if r.out_rel for part in Path(r.out_rel).parts]
        leaks += [("<file names>", f) for f in scan_text(names, [shared])]
        scanned = self.scanned()
        return [(rel, finding) for rel, findings in scanned for finding in findings] + leaks
