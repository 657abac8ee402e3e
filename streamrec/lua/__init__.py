"""Lua scripts, one ``.lua`` file per script in this folder, loaded once.

Each file starts with a header comment giving its owner module and its
KEYS/ARGV contract. A script that shares helper functions with others names
them as a prelude (another ``.lua`` file of this folder), prepended when it is
loaded.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript


@cache
def source(name: str, *prelude: str) -> str:
    """The text of script ``name``, after the preludes it names (read once per process)."""
    folder = resources.files(__name__)
    parts = [folder.joinpath(f"{part}.lua").read_text(encoding="utf-8") for part in prelude]
    parts.append(folder.joinpath(f"{name}.lua").read_text(encoding="utf-8"))
    return "\n".join(parts)


def register(redis: aioredis.Redis, name: str, *prelude: str) -> AsyncScript:
    """Script ``name`` registered on ``redis`` (EVALSHA, loading it on first use)."""
    return redis.register_script(source(name, *prelude))
