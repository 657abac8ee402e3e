"""Batcher: concurrent submissions share one run; a result may fail its item alone."""

from __future__ import annotations

import asyncio

import pytest

from streamrec.batch import Batcher
from tests.conftest import wait_for


async def test_an_exception_in_place_of_a_result_fails_that_item_alone() -> None:
    """run returning an exception for one item raises it from that submit; the others succeed."""
    runs: list[list[int]] = []

    async def run(items: list[int]) -> list[int | Exception]:
        runs.append(items)
        return [ValueError(f"bad {i}") if i == 2 else i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(run)
    submits = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
    await asyncio.wait(submits)
    assert runs == [[1, 2, 3]]
    assert submits[0].result() == 10
    assert submits[2].result() == 30
    with pytest.raises(ValueError, match="bad 2"):
        submits[1].result()


async def test_an_exception_from_run_fails_the_whole_batch() -> None:
    """run raising fails every item that went out with it."""

    async def run(items: list[int]) -> list[int | Exception]:
        raise RuntimeError("down")

    batcher: Batcher[int, int] = Batcher(run)
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, 2)), return_exceptions=True)
    assert [str(r) for r in results] == ["down", "down"]
    with pytest.raises(RuntimeError, match="down"):
        await batcher.submit(3)


async def test_up_to_flights_runs_go_at_once_and_the_rest_wait_together() -> None:
    """With flights=2, an item submitted during one run goes out at once in a second run;
    those submitted while both are under way wait and share the next."""
    runs: list[list[int]] = []
    release = asyncio.Event()

    async def run(items: list[int]) -> list[int]:
        runs.append(items)
        await release.wait()
        return items

    batcher: Batcher[int, int] = Batcher(run, flights=2)
    submits = [asyncio.create_task(batcher.submit(0))]
    await wait_for(lambda: len(runs) == 1, what="the first run")
    submits.append(asyncio.create_task(batcher.submit(1)))
    await wait_for(lambda: len(runs) == 2, what="the second run, beside the first")
    submits += [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
    await asyncio.sleep(0)  # each of them has had its turn to submit
    assert runs == [[0], [1]]
    release.set()
    assert await asyncio.gather(*submits) == [0, 1, 2, 3, 4]
    assert runs == [[0], [1], [2, 3, 4]]
