"""The worker processes of the anonymize stage (:class:`ctpipe.deid.batch.Workers`): this process
and the forked ones share the chunks of a pass, every item comes back once, and an error in
either is raised, not lost."""

from __future__ import annotations

import os

import pytest

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
