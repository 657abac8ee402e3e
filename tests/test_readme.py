"""The README's Python API example runs as written, against the test Redis."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis

from streamrec.keys import Keys

README = Path(__file__).resolve().parent.parent / "README.md"
NAMESPACE = 'Keys("myapp")'
"""The example's one placeholder: the test puts its own namespace there."""


def api_example() -> str:
    """The python code block after "through the Python API" in README.md."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("through the Python API") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "no python block after the Python API paragraph"
    return match[1]


def run_python(code: str, *, redis_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -c code`` with REDIS_URL set, to completion."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=os.environ | {"REDIS_URL": redis_url},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_python_api_example_runs_as_written(
    redis_url: str, redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """The example adds an entry, its handler handles it, and it is acked and deleted."""
    code = api_example()
    assert code.count(NAMESPACE) == 1
    code = code.replace(NAMESPACE, f'Keys("{keys.namespace}")')
    finished = await asyncio.to_thread(run_python, code, redis_url=redis_url, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    [line] = [line for line in finished.stdout.splitlines() if line.startswith("handled ")]
    assert line.endswith("{'greeting': 'hello'}")
    assert await redis.xlen(keys.stream) == 0
    [group] = await redis.xinfo_groups(keys.stream)
    assert (group["name"], group["pending"]) == (keys.group, 0)
