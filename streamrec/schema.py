"""PostgreSQL's schema: the packaged migrations, applied in order under an advisory lock.

``migrate`` is safe to run from many replicas at once, creates the database if
it is missing, and can wait a bounded time for a server that is still starting.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from streamrec.retry import describe
from streamrec.settings import address

log = structlog.get_logger("streamrec.schema")

MIGRATION_LOCK = 0x5EC0_0001  # advisory lock id: one migrator at a time across replicas
WAIT_POLL_S = 0.5  # how often migrate tries again while it waits for the server
# What a server that is not up yet answers: nothing (refused, unresolved, timed
# out) or "the database system is starting up" (SQLSTATE 57P03).
NOT_UP = (OSError, TimeoutError, asyncpg.CannotConnectNowError)
CONNECT_TIMEOUT_S = 5.0  # the least one connection attempt is given


class DatabaseUnreachable(ConnectionError):
    """PostgreSQL did not accept a connection within the time allowed."""


def migrations() -> list[tuple[int, str, str]]:
    """The packaged migrations as (version, name, sql), in order."""
    found = []
    for entry in resources.files("streamrec.migrations").iterdir():
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(dsn: str, *, wait_s: float = 0.0) -> list[int]:
    """Create the database if missing, then apply pending migrations; returns those applied.

    Waits up to ``wait_s`` seconds for the server (``wait_for_server``). Safe to run
    from many replicas at once: an advisory lock serialises them.
    """
    await wait_for_server(dsn, wait_s=wait_s)
    await _create_database_if_missing(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            applied.append(version)
            log.info("migration_applied", version=version, name=name)
        return applied
    finally:
        await conn.close()


async def wait_for_server(dsn: str, *, wait_s: float) -> None:
    """Return once the server of ``dsn`` accepts a connection (its database may be missing).

    While the server is not up, tries again every WAIT_POLL_S for up to ``wait_s``
    seconds, then raises DatabaseUnreachable naming host:port and the last error.
    Any other refusal (a wrong password) raises at once: waiting cannot fix it.
    """
    clock = asyncio.get_running_loop().time
    deadline = clock() + wait_s
    for attempt in itertools.count():
        try:  # one attempt may outlast the deadline by CONNECT_TIMEOUT_S at most
            conn = await asyncpg.connect(dsn, timeout=max(deadline - clock(), CONNECT_TIMEOUT_S))
        except asyncpg.InvalidCatalogNameError:
            return  # the server answers; migrate creates the database
        except NOT_UP as exc:
            if clock() >= deadline:
                waited = f" within {wait_s:g} s" if wait_s > 0 else ""
                raise DatabaseUnreachable(
                    f"PostgreSQL at {address(dsn)} did not accept"
                    f" a connection{waited} ({describe(exc)})"
                ) from exc
            if attempt == 0:
                log.info("database_waiting", address=address(dsn), wait_s=wait_s,
                         error=describe(exc))  # fmt: skip
            await asyncio.sleep(min(WAIT_POLL_S, deadline - clock()))
        else:
            await conn.close()
            return


async def _create_database_if_missing(dsn: str) -> None:
    try:
        conn = await asyncpg.connect(dsn)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute(f'CREATE DATABASE "{name.replace(chr(34), "")}"')
        log.info("database_created", database=name)
    except asyncpg.DuplicateDatabaseError:
        pass
    finally:
        await admin.close()
