"""Everything the server must not lose, on disk, written atomically, resumed after any restart.

Layout of the spool folder::

    incoming/<study>/<series>/<sop>.dcm   received instances (written to .tmp/, then renamed)
    jobs/<job id>/input/<sop>.dcm         a complete series, moved here from incoming in one rename
    jobs/<job id>/job.json                status, timings, reason, send state (atomic rewrite)
    jobs/<job id>/out/                    predict's outputs (each series folder appears complete)

A series is complete ``quiet_seconds`` after its newest file. A job's life: ``queued`` ->
``running`` -> ``predicted`` | ``refused`` | ``failed``; the results of a predicted one are ``pending`` ->
``sent`` (or ``retrying``, with the next attempt time). After a SIGKILL at any moment, starting
again finds every received instance in ``incoming`` or in a job; a job left ``running`` runs again
from its input (its partial outputs are discarded first, nothing of them was sent).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from ctpipe.fileio import write_json

STATES = ("queued", "running", "predicted", "refused", "failed")


def instance_uids(ds) -> tuple[str, str, str]:
    """(Study, Series, SOP Instance UID) of a received dataset, '' where missing: the spool's key."""
    return tuple(
        str(ds.get(k, "") or "")
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    )


class Refused(ValueError):
    """An instance the spool does not take (limits); the message is the reason."""


class Spool:
    def __init__(self, root: Path, quiet_seconds: float, max_study_bytes: int) -> None:
        self.root = Path(root)
        self.incoming, self.jobs = self.root / "incoming", self.root / "jobs"
        self.tmp = self.incoming / ".tmp"
        for folder in (self.incoming, self.jobs, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.quiet = float(quiet_seconds)
        self.max_study = int(max_study_bytes)
        self.lock = threading.Lock()  # receive vs. the move of a series into a job
        self._bytes: dict[str, int] = {}  # study -> bytes in incoming (read from disk once)

    # -- receiving ---------------------------------------------------------------------------
    def receive(self, data: bytes, study: str, series: str, sop: str) -> None:
        """Store one instance (``data``: a DICOM file); the same SOP twice is stored once."""
        for uid in (study, series, sop):
            if not uid or "/" in uid or uid.startswith("."):
                raise Refused(f"unusable UID {uid!r}")
        folder = self.incoming / study / series
        if self.study_bytes(study) + len(data) > self.max_study:
            raise Refused(f"study larger than max_study_mb ({self.max_study >> 20} MB)")
        fd, tmp = tempfile.mkstemp(dir=self.tmp, suffix=".dcm")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with self.lock:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{sop}.dcm"
            before = target.stat().st_size if target.exists() else 0  # the same SOP again
            current = self.study_bytes(study)  # counted before the new file lands
            os.replace(tmp, target)
            self._bytes[study] = current + len(data) - before

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

    def make_job(self, series: Path) -> str:
        """Move a complete series into a new job (one rename) and queue it; return the job id."""
        job_id = f"{time.time_ns():020d}-{os.urandom(3).hex()}"
        folder = self.jobs / job_id
        folder.mkdir()
        with self.lock:
            study = series.parent.name
            current = self.study_bytes(study)  # counted before the move
            moved = sum(p.stat().st_size for p in series.glob("*.dcm"))
            os.rename(series, folder / "input")
            self._bytes[study] = max(0, current - moved)
            try:
                series.parent.rmdir()  # the study folder, when this was its last series
            except OSError:
                pass
        self._new_record(folder)
        return job_id

    def _new_record(self, folder: Path) -> dict:
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
        }
        self.save(record)
        return record

    # -- job records -------------------------------------------------------------------------
    def load(self, job_id: str) -> dict:
        return json.loads((self.jobs / job_id / "job.json").read_text())

    def save(self, record: dict) -> None:
        write_json(self.jobs / record["id"] / "job.json", record)

    def records(self) -> list[dict]:
        out = []
        for folder in sorted(self.jobs.iterdir()):
            if (folder / "job.json").is_file():
                out.append(self.load(folder.name))
        return out

    def recover(self) -> dict[str, int]:
        """Bring the spool to a state the server can resume from (after a crash or a kill)."""
        counts = {"requeued": 0, "recorded": 0, "removed": 0, "tmp_removed": 0}
        for tmp in self.tmp.iterdir():  # half-received instances: never acknowledged
            tmp.unlink()
            counts["tmp_removed"] += 1
        for folder in sorted(p for p in self.jobs.iterdir() if p.is_dir()):  # not a probe file
            if not (folder / "job.json").is_file():
                if (folder / "input").is_dir():  # killed between the move and the record
                    self._new_record(folder)
                    counts["recorded"] += 1
                else:  # killed between mkdir and the move: the series is still incoming
                    shutil.rmtree(folder)
                    counts["removed"] += 1
                continue
            record = self.load(folder.name)
            if record["status"] == "running":
                shutil.rmtree(folder / "out", ignore_errors=True)
                record["status"] = "queued"
                self.save(record)
                counts["requeued"] += 1
        return counts

    def claim(self) -> dict | None:
        """The oldest queued job, marked running (one claimant at a time)."""
        with self.lock:
            for record in self.records():
                if record["status"] == "queued":
                    record.update(status="running", started=time.time())
                    self.save(record)
                    return record
        return None

    def results(self, job_id: str) -> list[Path]:
        """The files to send for a job: every SEG and SR it wrote."""
        out = self.jobs / job_id / "out"
        return sorted(out.glob("*/seg.dcm")) + sorted(out.glob("*/sr.dcm"))

    def depth(self) -> int:
        return sum(r["status"] in ("queued", "running") for r in self.records())
