"""The event loop the commands run on: uvloop by default, the standard one on request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamrec.settings import Settings
from tests.processes import environment, streamrec


@pytest.mark.parametrize(("chosen", "loop"), [(None, "uvloop"), ("asyncio", "asyncio")])
async def test_consume_runs_on_the_chosen_event_loop(
    settings: Settings, tmp_path: Path, chosen: str | None, loop: str
) -> None:
    """``consume`` says which loop it runs on: uvloop's unless STREAMREC_EVENT_LOOP=asyncio."""
    extra = {} if chosen is None else {"STREAMREC_EVENT_LOOP": chosen}
    env = environment(settings, STREAMREC_METRICS_PORT="0", **extra)
    done = await streamrec("consume", "--until-idle", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    started = [
        json.loads(line)
        for line in (done.stdout + done.stderr).splitlines()
        if '"consumer_started"' in line
    ]
    assert [event["event_loop"] for event in started] == [loop]
