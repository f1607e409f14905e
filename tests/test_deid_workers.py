"""The worker processes of the anonymize stage (:class:`ctpipe.deid.batch.Workers`): this process
and the forked ones share the chunks of a pass, every item comes back once, and an error in
either is raised, not lost; workers started early (:mod:`ctpipe.prefork`) do the same and leave
their start-up out of the CPU time they report."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from ctpipe import config, prefork
from ctpipe.deid import batch, stage

ROOT = Path(__file__).resolve().parents[1]


def square(job: int, item: int) -> tuple[int, int, int]:
    return item, item * item + (job or 0), os.getpid()


def fail_on(job: int, item: int) -> int:
    if item == job:
        raise ValueError(f"item {item}")
    return item


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_item_comes_back_once(workers):
    items = list(range(203))
    with batch.Workers(workers, chunksize=4) as pool:
        out = pool.map(square, items, "test", lambda chunk: 1)
        again = pool.map(square, items[:5], "test", lambda chunk: 2)  # a second pass, same pool
    assert sorted(i for i, _, _ in out) == items
    assert all(v == i * i + 1 for i, v, _ in out)
    assert sorted(v for _, v, _ in again) == [i * i + 2 for i in range(5)]
    pids = {pid for _, _, pid in out}
    assert os.getpid() in pids  # this process takes chunks too
    if workers > 1:
        assert len(pids) > 1  # and the forked ones do


def test_a_pass_begins_before_its_results_are_asked_for():
    with batch.Workers(2, chunksize=4) as pool:
        pending = pool.start(square, list(range(40)), "test", lambda chunk: 0)
        out = pending()
    assert sorted(i for i, _, _ in out) == list(range(40))


@pytest.mark.parametrize("bad", [0, 150])  # the first chunk (a worker's or this process's), late
def test_an_error_in_any_chunk_is_raised(bad):
    with batch.Workers(2, chunksize=4) as pool:
        with pytest.raises(ValueError, match=f"item {bad}"):
            pool.map(fail_on, list(range(200)), "test", lambda chunk: bad)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_chunks_shrink_toward_the_end(workers):
    sizes: list[int] = []  # job_of is called here once per chunk, whoever runs it
    with batch.Workers(workers, chunksize=8) as pool:
        out = pool.map(square, list(range(425)), "test", lambda chunk: sizes.append(len(chunk)))
    assert len(out) == sum(sizes) == 425
    assert sizes[0] >= 425 // (batch.GUIDED * workers) > 8 >= sizes[-1]


def test_a_pass_of_one_chunk_runs_here():
    with batch.Workers(2, chunksize=8) as pool:
        out = pool.map(square, list(range(8)), "test", lambda chunk: 0)
        larger = pool.map(square, list(range(9)), "test", lambda chunk: 0)
    assert {pid for _, _, pid in out} == {os.getpid()}
    assert len(larger) == 9


def burn() -> None:
    """A worker's start-up that takes CPU time (a started worker's initialiser)."""
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass


def test_started_workers_take_chunks_and_report_their_work_only():
    started = prefork.start(1, __name__, "burn")
    try:
        with batch.Workers(2, chunksize=4, started=started) as pool:
            out = pool.map(square, list(range(203)), "test", lambda chunk: 1)
            total = pool.call(os.times)()
            work = pool.call(prefork.work_cpu)()
        assert sorted(i for i, _, _ in out) == list(range(203))
        assert len({pid for _, _, pid in out}) == 2
        assert total.user + total.system >= 0.25 > 0.15 > work  # its start-up is not its work
        assert 0 <= pool.worker_cpu() <= work
    finally:
        started.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_call_returns_its_value_or_raises_its_error(workers):
    with batch.Workers(workers) as pool:
        value, error = pool.call(square, 1, 3), pool.call(fail_on, 2, 2)
        assert value()[:2] == (3, 10)
        with pytest.raises(ValueError, match="item 2"):
            error()
        if workers > 1:
            assert value()[2] != os.getpid()


@pytest.mark.parametrize("n", [9, 40, 203])
def test_the_last_pass_lets_the_workers_go_and_no_pass_may_follow(n):
    with batch.Workers(2, chunksize=4) as pool:
        out = pool.start(square, list(range(n)), "test", lambda chunk: 0, last=True)()
        assert sorted(i for i, _, _ in out) == list(range(n))
        with pytest.raises(RuntimeError, match="after the last pass"):
            pool.map(square, [1], "test")


def test_the_switch_interval_is_short_while_workers_run_and_restored_after():
    before = sys.getswitchinterval()
    with batch.Workers(2) as pool:
        assert sys.getswitchinterval() == pytest.approx(batch.SWITCH_INTERVAL)
        assert len(pool.map(square, list(range(40)), "test")) == 40
    assert sys.getswitchinterval() == before


PARENT = os.getpid()  # the test process; a forked worker inherits the value


def die_in_a_worker(job: int, item: int) -> int:
    """Kill the forked worker that runs item ``job`` (as the kernel's OOM killer would)."""
    if item == job and os.getpid() != PARENT:
        os.kill(os.getpid(), signal.SIGKILL)
    return item


@pytest.fixture
def no_hang():
    """A wait that never ends fails the test after 60 s instead of hanging the run."""

    def alarm(signum, frame):
        raise TimeoutError("still waiting after 60 s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("early", [False, True])  # forked here, or started before (prefork)
def test_a_worker_killed_mid_pass_fails_the_pass_naming_what_it_held(no_hang, early):
    started = prefork.start(1, __name__, "burn") if early else None
    try:
        with batch.Workers(2, chunksize=4, started=started) as pool:
            # item 0 is in the first chunk sent to the forked worker
            with pytest.raises(batch.WorkerDied, match=r"test: worker process \d+ died") as err:
                pool.map(die_in_a_worker, list(range(200)), "test", lambda chunk: 0)
        assert "killed by SIGKILL" in str(err.value)
        assert err.value.lost[:3] == [0, 1, 2]
    finally:
        if started is not None:
            started.stop()


def test_a_worker_killed_during_a_call_fails_the_call(no_hang):
    with batch.Workers(2) as pool:
        with pytest.raises(batch.WorkerDied, match="killed by SIGKILL.* during die_in_a_worker"):
            pool.call(die_in_a_worker, 5, 5)()


def test_workers_that_exit_after_the_last_pass_are_not_taken_for_dead(no_hang):
    with batch.Workers(2, chunksize=4) as pool:
        out = pool.start(square, list(range(203)), "test", lambda chunk: 0, last=True)()
        time.sleep(2 * batch.DEATH_POLL)
        assert all(child.exitcode in (None, 0) for child in pool.children)
        assert len(pool.children) == 1
    assert len(out) == 203


DEID_FILE = batch.deid_file


def deid_or_die(job: batch.DeidJob, item: tuple[str, str]):
    """The de-identification of a file, but a forked worker is killed on its first file."""
    if os.getpid() != PARENT:
        os.kill(os.getpid(), signal.SIGKILL)
    return DEID_FILE(job, item)


def test_a_worker_killed_mid_run_stops_the_stage_and_empties_its_output(
    write_tiny_cohort, tmp_path, monkeypatch, caplog, no_hang
):
    raw, out, private = tmp_path / "raw", tmp_path / "anon", tmp_path / "private"
    write_tiny_cohort(raw / "dicom", n=2, seed=3)
    (raw / "cohort.json").write_text(json.dumps({"source": "synthetic"}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["anonymize"].update(key_file="")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = config.load(tmp_path / "params.yaml").anonymize
    monkeypatch.delenv("CTPIPE_DEID_KEY", raising=False)
    monkeypatch.setattr(batch, "deid_file", deid_or_die)  # the workers fork after this
    with caplog.at_level(logging.ERROR, logger="anonymize"):
        code = stage.run(raw, out, private, tmp_path / "anonymize.json", cfg, 2)
    assert code == 1
    assert "anonymize: worker process" in caplog.text
    assert "died (killed by SIGKILL)" in caplog.text and "run the stage again" in caplog.text
    assert "items in the workers not done" in caplog.text
    assert "raw/dicom/" not in caplog.text  # an input's path may name the patient
    assert out.is_dir() and not any(out.iterdir())  # nothing unscanned is left behind
    assert not (tmp_path / "anonymize.json").exists()
