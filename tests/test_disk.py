"""Disk: blocking file calls run in worker threads, those submitted meanwhile sharing a hop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streamrec.disk import Disk


async def test_calls_submitted_during_a_hop_share_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one hop is held, 10 calls wait and then run in a single hop, off the loop."""
    hops: list[int] = []
    to_thread = asyncio.to_thread

    async def counted(function: Callable[..., Any], *args: Any) -> Any:
        hops.append(len(args[0]))
        return await to_thread(function, *args)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    disk = Disk(flights=1)
    entered, release = threading.Event(), threading.Event()
    threads: list[int] = []

    def held() -> str:
        entered.set()
        release.wait(timeout=30)
        return "held"

    def call(n: int) -> int:
        threads.append(threading.get_ident())
        return (tmp_path / f"f{n}").write_text(str(n)) - 1 + n

    first = asyncio.create_task(disk.run(held))
    await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
    rest = [asyncio.create_task(disk.run(call, n)) for n in range(10)]
    await asyncio.sleep(0)  # each submit has queued its call behind the held hop
    release.set()
    assert await first == "held"
    assert await asyncio.gather(*rest) == list(range(10))
    assert hops == [1, 10]  # the held call's hop, then one for the ten
    assert threading.get_ident() not in threads


async def test_a_failing_call_fails_alone(tmp_path: Path) -> None:
    """An exception raised by one call reaches its caller; the calls beside it succeed."""
    disk = Disk()
    missing, present = tmp_path / "missing", tmp_path / "present"
    present.write_bytes(b"x")
    results = await asyncio.gather(
        disk.run(present.read_bytes),
        disk.run(missing.read_bytes),
        disk.run(lambda: present.stat().st_size),
        return_exceptions=True,
    )
    assert results[0] == b"x"
    assert isinstance(results[1], FileNotFoundError)
    assert results[2] == 1
    with pytest.raises(FileNotFoundError):
        await disk.run(missing.read_bytes)
