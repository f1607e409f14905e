"""The worker processes of the anonymize stage (:class:`ctpipe.deid.batch.Workers`): this process
and the forked ones share the chunks of a pass, every item comes back once, and an error in
either is raised, not lost; workers started early (:mod:`ctpipe.prefork`) do the same and leave
their start-up out of the CPU time they report."""

from __future__ import annotations

import os
import sys
import time

import pytest

from ctpipe import prefork
from ctpipe.deid import batch


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
