"""Everything the server must not lose, on disk, written durably, resumed after any restart.

Layout of the spool folder (owner-only: folders 0700, files 0600)::

    incoming/<study>/<series>/<sop>.dcm   received instances (written to .tmp/, then renamed)
    jobs/<job id>/input/<sop>.dcm         a complete series, moved here from incoming in one rename
    jobs/<job id>/job.json                status, timings, reason, send state (atomic rewrite)
    jobs/<job id>/out/                    predict's outputs (each series folder appears complete)
    quarantine/<job id>/                  a job whose job.json could not be read, with REASON.txt

Folder names from data are UIDs checked by :func:`ctpipe.safepath.uid_component`; every write and
delete is checked to stay inside the spool. A series is complete ``quiet_seconds`` after its
newest file. A job's life: ``queued`` -> ``running`` -> ``predicted`` | ``refused`` | ``failed``; the
results of a predicted one are ``pending`` -> ``sent`` (or ``retrying``, with the next attempt time,
and ``failed`` after the last attempt). A finished job (``done`` set) keeps its input for
``retention.hold_hours`` and is removed after ``retention.jobs_days``. After a SIGKILL at any
moment, starting again finds every received instance in ``incoming`` or in a job; a job left
``running`` runs again from its input (its partial outputs are discarded first, nothing of them
was sent). Renames and job records are fsynced before they count.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

from ctpipe.safepath import UnsafePath, inside, uid_component
from ctpipe.serve.telemetry import tag

log = logging.getLogger("ctpipe.serve")
STATES = ("queued", "running", "predicted", "refused", "failed")
JOB_ID = re.compile(r"[0-9]{20}-[0-9a-f]{6}")
STALE_TMP_SECONDS = 3600  # shared spool: a part this old belongs to a receiver that died


def instance_uids(ds) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance UID) of a received dataset, '' where missing: the spool's key."""
    return tuple(
        str(ds.get(k, "") or "")
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )


class Refused(ValueError):
    """An instance the spool does not take; the message is the reason (no UID in it).
    ``resources`` tells a full spool or disk (try later) from an instance that is unusable."""

    def __init__(self, reason: str, resources: bool) -> None:
        super().__init__(reason)
        self.resources = resources


class SpoolError(RuntimeError):
    """A spool the server must not start on (the message says why)."""


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, data: bytes) -> None:
    """Write ``path`` owner-only (0600) through a temporary file: fsync, rename, fsync the
    folder, so that after a crash it is either the old file or the whole new one (the DICOM
    node's job records, its tokens file)."""
    # a name of its own: processes sharing the spool may write the same record
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def private_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)


class Spool:
    def __init__(
        self,
        root: Path,
        quiet_seconds: float,
        max_study_bytes: int,
        min_free_bytes: int = 0,
    ) -> None:
        self.root = Path(root)
        if self.root.exists() and stat.S_IMODE(self.root.stat().st_mode) & 0o077:
            mode = oct(stat.S_IMODE(self.root.stat().st_mode))
            raise SpoolError(
                f"{self.root}: mode {mode} lets other users read patient data; "
                f"chmod 700 it (and its contents: chmod -R go-rwx)"
            )
        self.incoming, self.jobs = self.root / "incoming", self.root / "jobs"
        self.tmp, self.quarantine = self.incoming / ".tmp", self.root / "quarantine"
        for folder in (self.root, self.incoming, self.jobs, self.tmp, self.quarantine):
            private_dir(folder)
        self.quiet = float(quiet_seconds)
        self.max_study = int(max_study_bytes)
        self.min_free = int(min_free_bytes)
        self._thread_lock = threading.Lock()
        self._lock_file = self.root / ".lock"
        self._bytes: dict[str, int] = {}  # study -> bytes in incoming (read from disk once)

    @contextlib.contextmanager
    def lock(self):
        """Receive vs. the move of a series into a job vs. a claim: one at a time, among the
        threads of this process (a lock) and the processes sharing the spool (``flock`` on
        ``.lock``; NFS v4 supports it)."""
        with self._thread_lock:
            fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    # -- receiving ---------------------------------------------------------------------------
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def low_disk(self) -> str:
        """Why new instances are refused for lack of disk, or ''."""
        free = self.free_bytes()
        if free < self.min_free:
            return (
                f"free disk {free >> 20} MB below limits.min_free_disk_mb ({self.min_free >> 20})"
            )
        return ""

    def check(self, study: str, series: str, sop: str) -> None:
        """Refuse an instance before its bytes are stored: UIDs that are not UIDs, a full disk."""
        for name, uid in (("Study", study), ("Series", series), ("SOP", sop)):
            try:
                uid_component(uid)
            except UnsafePath as err:
                raise Refused(f"{name} Instance UID: {err}", resources=False) from None
        low = self.low_disk()
        if low:
            raise Refused(low, resources=True)

    def receive(self, data: bytes, study: str, series: str, sop: str) -> None:
        """Store one instance (``data``: a DICOM file); the same SOP twice is stored once."""
        self.check(study, series, sop)  # before the bytes are written
        tmp = self.new_tmp()
        with open(tmp, "wb") as f:
            f.write(data)
        self._move(tmp, study, series, sop)

    def new_tmp(self) -> Path:
        """A new owner-only file in ``incoming/.tmp`` for an instance being received."""
        name = f"{time.time_ns()}-{os.urandom(4).hex()}.part"
        os.close(os.open(self.tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return self.tmp / name

    def place(self, tmp: Path, study: str, series: str, sop: str) -> None:
        """Move a fully received ``tmp`` file into its series (fsynced), or delete it and raise
        :class:`Refused` when its UIDs are not UIDs, the disk is low, or the study would outgrow
        ``max_study_mb``."""
        try:
            self.check(study, series, sop)
        except Refused:
            tmp.unlink(missing_ok=True)
            raise
        self._move(tmp, study, series, sop)

    def _move(self, tmp: Path, study: str, series: str, sop: str) -> None:
        """:meth:`place` for an instance already checked."""
        try:
            size = tmp.stat().st_size
            if self.study_bytes(study) + size > self.max_study:
                raise Refused(
                    f"study larger than limits.max_study_mb ({self.max_study >> 20} MB)",
                    resources=True,
                )
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            with self.lock():
                folder = inside(self.root, self.incoming / study / series)
                for level in (folder.parent, folder):
                    if not level.is_dir():
                        level.mkdir(mode=0o700)
                target = folder / f"{sop}.dcm"
                before = target.stat().st_size if target.exists() else 0  # the same SOP again
                current = self.study_bytes(study)  # counted before the new file lands
                os.replace(tmp, target)
                fsync_dir(folder)
                self._bytes[study] = current + size - before
        finally:
            tmp.unlink(missing_ok=True)

    def study_bytes(self, study: str) -> int:
        """Bytes of the study in ``incoming`` (kept in memory; counted on disk the first time,
        so a restart starts from what is there)."""
        if study not in self._bytes:
            folder = self.incoming / study
            found = folder.rglob("*.dcm") if folder.is_dir() else []
            self._bytes[study] = sum(p.stat().st_size for p in found)
        return self._bytes[study]

    def complete_series(self, now: float | None = None) -> list[Path]:
        """Incoming series folders quiet for ``quiet_seconds``."""
        now = time.time() if now is None else now
        ready = []
        for study in sorted(p for p in self.incoming.iterdir() if p.is_dir() and p.name != ".tmp"):
            for series in sorted(p for p in study.iterdir() if p.is_dir()):
                mtimes = [p.stat().st_mtime for p in series.glob("*.dcm")]
                if mtimes and now - max(mtimes) >= self.quiet:
                    ready.append(series)
        return ready

    def make_job(self, series: Path) -> str | None:
        """Move a complete series into a new job (one rename) and queue it; return the job id,
        or None when another receiver sharing the spool made the job first."""
        job_id = f"{time.time_ns():020d}-{os.urandom(3).hex()}"
        folder = inside(self.root, self.jobs / job_id)
        with self.lock():
            study = series.parent.name
            self._bytes.pop(study, None)  # another receiver may have changed it: count again
            current = self.study_bytes(study)  # counted before the move
            try:
                moved = sum(p.stat().st_size for p in series.glob("*.dcm"))
                folder.mkdir(mode=0o700)
                os.rename(inside(self.root, series), folder / "input")
            except FileNotFoundError:  # the series was moved by another receiver: its job
                shutil.rmtree(folder, ignore_errors=True)
                return None
            fsync_dir(folder)
            fsync_dir(series.parent)
            self._bytes[study] = max(0, current - moved)
            try:
                series.parent.rmdir()  # the study folder, when this was its last series
            except OSError:
                pass
            self._new_record(folder, study, series.name)  # in the lock: never seen half made
        return job_id

    def _new_record(self, folder: Path, study: str = "", series: str = "") -> dict:
        files = sorted((folder / "input").glob("*.dcm"))
        record = {
            "id": folder.name,
            "status": "queued",
            "instances": len(files),
            "received_last": max((p.stat().st_mtime for p in files), default=None),
            "queued": time.time(),
            "send": "waiting",  # -> pending when predicted, "none" otherwise
            "attempts": 0,
            "next_attempt": 0.0,
            "reason": "",
            "done": None,  # when nothing more will happen to it: the retention clock starts
            "input_deleted": None,
            "study": tag(study) if study else "",  # hashed: the audit names jobs by these
            "series": tag(series) if series else "",
        }
        self.save(record)
        return record

    # -- job records -------------------------------------------------------------------------
    def load(self, job_id: str) -> dict:
        return json.loads((self.jobs / job_id / "job.json").read_text())

    def save(self, record: dict) -> None:
        path = inside(self.root, self.jobs / record["id"] / "job.json")
        durable_write(path, json.dumps(record, indent=2, sort_keys=True).encode())

    def records(self) -> list[dict]:
        """Every job's record, oldest first; a job whose record cannot be read is quarantined."""
        out = []
        for folder in sorted(self.jobs.iterdir()):
            if not (folder / "job.json").is_file():
                continue
            try:
                record = self.load(folder.name)
                if not isinstance(record, dict) or record.get("id") != folder.name:
                    raise ValueError("record of another job")
                if record.get("status") not in STATES:
                    raise ValueError("no known status")
            except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
                self.quarantine_job(folder, f"job.json unreadable: {type(err).__name__}")
                continue
            out.append(record)
        return out

    def quarantine_job(self, folder: Path, reason: str) -> None:
        """Move a job the server cannot handle out of the queue, with the reason beside it."""
        target = inside(self.root, self.quarantine / folder.name)
        os.rename(inside(self.root, folder), target)
        fsync_dir(self.jobs)
        durable_write(target / "REASON.txt", (reason + "\n").encode())
        log.error("job %s quarantined: %s", folder.name, reason)

    def recover(self, shared: bool = False) -> dict[str, int]:
        """Bring the spool to a state the server can resume from (after a crash or a kill).
        ``shared``: other processes use the spool now (the roles): parts younger than
        ``STALE_TMP_SECONDS`` may be theirs and stay, and running jobs are left to the broker,
        which gives a job whose worker died to another one."""
        counts = {"requeued": 0, "recorded": 0, "removed": 0, "tmp_removed": 0}
        for tmp in self.tmp.iterdir():  # half-received instances: never acknowledged
            try:
                if shared and time.time() - tmp.stat().st_mtime < STALE_TMP_SECONDS:
                    continue
            except FileNotFoundError:  # placed by another receiver meanwhile
                continue
            tmp.unlink(missing_ok=True)
            counts["tmp_removed"] += 1
        with self.lock():
            self._recover_jobs(counts, shared)
        return counts

    def _recover_jobs(self, counts: dict[str, int], shared: bool) -> None:
        for folder in sorted(p for p in self.jobs.iterdir() if p.is_dir()):  # not a probe file
            if not (folder / "job.json").is_file():
                if (folder / "input").is_dir():  # killed between the move and the record
                    self._new_record(folder)
                    counts["recorded"] += 1
                else:  # killed between mkdir and the move: the series is still incoming
                    shutil.rmtree(inside(self.root, folder))
                    counts["removed"] += 1
        for record in self.records():
            if record["status"] == "running" and not shared:
                shutil.rmtree(inside(self.root, self.jobs / record["id"] / "out"), True)
                record["status"] = "queued"
                self.save(record)
                counts["requeued"] += 1

    def claim(self) -> dict | None:
        """The oldest queued job, marked running (one claimant at a time)."""
        with self.lock():
            for record in self.records():
                if record["status"] == "queued":
                    record.update(status="running", started=time.time())
                    self.save(record)
                    return record
        return None

    def claim_job(self, job_id: str, redelivered: bool) -> tuple[str, dict]:
        """A job delivered by the broker: (what to do, its record). ``run``: it was queued, or
        running when the message is a redelivery (its worker died): now running here;
        ``send``: its results are stored (a worker died before its acknowledgement); ``skip``:
        finished, or running elsewhere (a second message of a job published twice)."""
        with self.lock():
            record = self.load(job_id)
            status = record.get("status")
            if status == "queued" or (status == "running" and redelivered):
                record.update(
                    status="running",
                    started=time.time(),
                    worker=f"{socket.gethostname()}:{os.getpid()}",  # who runs it (the logs)
                    runs=record.get("runs", 0) + 1,  # 2 and more: redelivered
                )
                self.save(record)
                return "run", record
            if status == "predicted" and record.get("send") in ("pending", "retrying"):
                return "send", record
            return "skip", record

    def results(self, job_id: str) -> list[Path]:
        """The files to send for a job: every SEG and SR it wrote."""
        out = self.jobs / job_id / "out"
        return sorted(out.glob("*/seg.dcm")) + sorted(out.glob("*/sr.dcm"))

    def depth(self) -> int:
        return sum(r["status"] in ("queued", "running") for r in self.records())

    # -- retention ---------------------------------------------------------------------------
    def expire(self, hold_seconds: float, keep_seconds: float, now: float | None = None) -> list:
        """Delete the input of jobs done ``hold_seconds`` ago and whole jobs done
        ``keep_seconds`` ago; return (job id, what) for each deletion."""
        now = time.time() if now is None else now
        deleted = []
        for record in self.records():
            if record.get("done") is None:
                continue
            age = now - record["done"]
            folder = inside(self.root, self.jobs / record["id"])
            if age >= keep_seconds:
                shutil.rmtree(folder)
                deleted.append((record["id"], "job"))
            elif age >= hold_seconds and record.get("input_deleted") is None:
                shutil.rmtree(folder / "input", ignore_errors=True)
                record["input_deleted"] = now
                self.save(record)
                deleted.append((record["id"], "input"))
        if deleted:
            fsync_dir(self.jobs)
        return deleted
