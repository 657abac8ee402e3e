"""Changing the partition count: refused until drained, then limits and dead letters follow
their business, and an interrupted change finishes when run again."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
import redis.asyncio as aioredis
from redis.crc import key_slot

from streamrec import repartition
from streamrec.keys import Keys
from streamrec.partitions import Layout, recorded
from streamrec.settings import Settings
from tests.conftest import entries
from tests.processes import environment, streamrec

BUSINESSES = [f"biz-{n}" for n in range(12)]
LIMITS = {business: str(n + 1) for n, business in enumerate(BUSINESSES[:8])}
Letter = dict[str, str]


@pytest_asyncio.fixture(loop_scope="session")
async def layout(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Layout]:
    """This test's namespace with 2 partitions recorded; every partition's keys (any count)
    are deleted afterwards."""
    await redis.set(keys.partitions, 2)
    yield Layout(keys.namespace, 2)
    async for key in redis.scan_iter(match="{" + keys.namespace + ":*", count=1000):
        await redis.delete(key)


def letter(n: int, business: str | None) -> Letter:
    """A dead letter as the consumer writes one: the entry's fields and its failure."""
    fields = {"v": "1", "recording_sid": f"RE{n:032x}", "status": "completed"}
    if business is not None:
        fields["business_id"] = business
    return fields | {
        "error": "PermanentError: 404",
        "attempts": "5",
        "origin_id": f"{1_000 + n}-0",
        "consumer": "c1",
        "failed_at": str(1_700_000_000_000 + n),
    }


async def drained_state(redis: aioredis.Redis, layout: Layout) -> list[Letter]:
    """Streams with their groups, slot limits and dead letters in each partition of
    ``layout``, nothing in work; returns the dead letters written."""
    for keys in layout:
        await redis.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    for business, limit in LIMITS.items():
        keys = layout.of(business)
        await redis.hset(keys.slot_limits, business, limit)
        await redis.sadd(keys.slot_businesses, business)
    written = [letter(n, BUSINESSES[n % len(BUSINESSES)]) for n in range(30)]
    written += [letter(99, None)]
    for fields in written:
        await redis.xadd(layout.of(fields.get("business_id")).dead, fields)  # type: ignore[arg-type]
    return written


async def live_consumer(redis: aioredis.Redis, layout: Layout, name: str = "c1") -> None:
    """``name`` in the registry with its heartbeat expiring a minute from now."""
    now = await repartition.now_ms(redis)
    await redis.zadd(layout.home.consumers, {name: now + 60_000})


async def letters_everywhere(redis: aioredis.Redis, namespace: str) -> Counter[str]:
    """Every dead letter of the namespace under 1 to 4 partitions, by where it is."""
    found: Counter[str] = Counter()
    streams = {keys.dead for count in range(1, 5) for keys in Layout(namespace, count)}
    for stream in sorted(streams):
        for _, fields in await entries(redis, stream):
            found[f"{stream} {json.dumps(fields, sort_keys=True)}"] += 1
    return found


def expected_letters(written: list[Letter], layout: Layout) -> Counter[str]:
    """Each letter once, in the dead letters of its business's partition under ``layout``."""
    return Counter(
        f"{layout.of(f.get('business_id')).dead} {json.dumps(f, sort_keys=True)}" for f in written
    )


async def limits_everywhere(redis: aioredis.Redis, namespace: str) -> dict[str, dict[str, str]]:
    """Every partition's slot limits (non-empty ones), under 1 to 4 partitions."""
    found = {}
    for count in range(1, 5):
        for keys in Layout(namespace, count):
            if limits := await redis.hgetall(keys.slot_limits):
                found[keys.slot_limits] = {str(k): str(v) for k, v in limits.items()}
    return found


def expected_limits(layout: Layout) -> dict[str, dict[str, str]]:
    """LIMITS, each in the slot limits of its business's partition under ``layout``."""
    found: dict[str, dict[str, str]] = {}
    for business, limit in LIMITS.items():
        found.setdefault(layout.of(business).slot_limits, {})[business] = limit
    return found


async def test_show_lists_each_partition(redis: aioredis.Redis, layout: Layout) -> None:
    """``show`` gives both counts and, per partition, its tag, stream, slot, length, pending."""
    await drained_state(redis, layout)
    await redis.xadd(layout.partitions[1].stream, {"v": "1"})
    report = await repartition.show(redis, layout.namespace, configured=3)
    assert (report["recorded"], report["configured"]) == (2, 3)
    assert [(p["index"], p["tag"], p["stream"], p["length"], p["pending"])
            for p in report["partitions"]] == [
        (k.partition, k.tag, k.stream, k.partition, 0) for k in layout
    ]  # fmt: skip
    assert [p["slot"] for p in report["partitions"]] == [
        key_slot(k.stream.encode()) for k in layout
    ]
    assert "refuse to start" in repartition.render(report)


async def test_refused_while_a_consumer_is_alive(redis: aioredis.Redis, layout: Layout) -> None:
    """A live consumer in the registry: refused naming it, nothing moved, count still 2."""
    written = await drained_state(redis, layout)
    await live_consumer(redis, layout)
    expired = await repartition.now_ms(redis) - 1
    await redis.zadd(layout.home.consumers, {"crashed": expired})
    outcome = await repartition.change(redis, layout.namespace, current=2, target=4)
    assert outcome.status == "refused"
    assert outcome.survey.lines() == ["consumers alive: c1"]
    assert await recorded(redis, layout.namespace) == 2
    assert await letters_everywhere(redis, layout.namespace) == expected_letters(written, layout)
    assert await limits_everywhere(redis, layout.namespace) == expected_limits(layout)


async def test_refused_while_an_entry_is_pending(redis: aioredis.Redis, layout: Layout) -> None:
    """An entry read and not acked: refused, saying which partition holds it."""
    written = await drained_state(redis, layout)
    keys = layout.partitions[1]
    entry_id = await redis.xadd(keys.stream, {"v": "1"})
    await redis.xreadgroup(keys.group, "c1", {keys.stream: ">"})
    outcome = await repartition.change(redis, layout.namespace, current=2, target=4)
    assert outcome.status == "refused"
    assert outcome.survey.lines() == [f"partition 1 {{{keys.tag}}}: 1 in the stream, 1 pending"]
    await redis.xdel(keys.stream, entry_id)  # gone from the stream, still pending
    outcome = await repartition.change(redis, layout.namespace, current=2, target=4)
    assert outcome.survey.lines() == [f"partition 1 {{{keys.tag}}}: 1 pending"]
    assert await recorded(redis, layout.namespace) == 2
    assert await letters_everywhere(redis, layout.namespace) == expected_letters(written, layout)


async def test_refused_while_parked_or_holding_a_slot(
    redis: aioredis.Redis, layout: Layout
) -> None:
    """A parked entry, or a slot lease still running, refuses; an expired lease does not."""
    await drained_state(redis, layout)
    now = await repartition.now_ms(redis)
    parked, holder = BUSINESSES[0], BUSINESSES[1]
    keys = layout.of(parked)
    await redis.rpush(keys.parked(parked), json.dumps({"f": {"v": "1"}, "d": 1}))
    await redis.zadd(keys.parked_set, {parked: now})
    await redis.zadd(layout.of(holder).slots(holder), {"1-0": now + 60_000, "2-0": now - 1})
    await redis.sadd(layout.of(holder).slot_businesses, holder)
    outcome = await repartition.change(redis, layout.namespace, current=2, target=4)
    assert outcome.status == "refused"
    lines = outcome.survey.lines()
    assert f"partition {keys.partition} {{{keys.tag}}}:" in " ".join(lines)
    assert "1 parked" in " ".join(lines)
    assert "1 slots held" in " ".join(lines)
    await redis.delete(keys.parked(parked))
    await redis.zrem(keys.parked_set, parked)
    await redis.zadd(layout.of(holder).slots(holder), {"1-0": now - 1})
    outcome = await repartition.change(redis, layout.namespace, current=2, target=4)
    assert outcome.status == "changed", outcome.survey.lines()


async def test_set_moves_limits_and_letters_to_their_partitions(
    redis: aioredis.Redis, layout: Layout
) -> None:
    """Drained, ``set 4`` puts each limit and letter in its business's partition under 4,
    records 4, removes the old partitions' leftover keys, and a second run is a no-op."""
    written = await drained_state(redis, layout)
    new = Layout(layout.namespace, 4)
    outcome = await repartition.change(redis, layout.namespace, current=2, target=4)
    assert outcome.status == "changed"
    assert outcome.letters == sum(
        1 for f in written if layout.of(f.get("business_id")) != new.of(f.get("business_id"))
    )
    assert await recorded(redis, layout.namespace) == 4
    assert await letters_everywhere(redis, layout.namespace) == expected_letters(written, new)
    assert await limits_everywhere(redis, layout.namespace) == expected_limits(new)
    for business in LIMITS:
        assert await redis.sismember(new.of(business).slot_businesses, business)
    kept = {k.tag for k in new}
    for keys in layout:
        assert await redis.exists(keys.stream) == (keys.tag in kept)
        members = await redis.smembers(keys.slot_businesses)
        assert all(new.of(str(b)).tag == keys.tag for b in members)
    before = await snapshot(redis, layout.namespace)
    again = await repartition.change(redis, layout.namespace, current=4, target=4)
    assert again.status == "unchanged"
    assert await snapshot(redis, layout.namespace) == before


async def snapshot(redis: aioredis.Redis, namespace: str) -> dict[str, str]:
    """Every key of the namespace (any partition count) and its type."""
    found = {}
    for pattern in ("{" + namespace + "}:*", "{" + namespace + ":*"):
        async for key in redis.scan_iter(match=pattern, count=1000):
            found[str(key)] = str(await redis.type(key))
    return found


async def test_a_change_stopped_half_way_finishes_when_run_again(
    redis: aioredis.Redis, layout: Layout
) -> None:
    """Limits and letters partly moved, one letter copied but not deleted at its source:
    running the change again ends with each letter once where it belongs, nothing lost."""
    written = await drained_state(redis, layout)
    new = Layout(layout.namespace, 4)
    # Given a run that moved partition 0's limits and two of its letters...
    await repartition.move_limits(redis, layout.partitions[0], new)
    mover = repartition.LetterMove(redis, new)
    assert await mover.run(layout.partitions[0], limit=2) == 2
    # ...and stopped between copying partition 1's next letter and deleting it there.
    source = layout.partitions[1]
    moving = [
        (i, f) for i, f in await entries(redis, source.dead)
        if new.of(f.get("business_id")).tag != source.tag
    ]  # fmt: skip
    assert await mover.copy(new.of(moving[0][1].get("business_id")), moving[0][1])
    assert await recorded(redis, layout.namespace) == 2
    # When the change runs again from the start, with a fresh mover:
    outcome = await repartition.change(redis, layout.namespace, current=2, target=4)
    assert outcome.status == "changed"
    assert await letters_everywhere(redis, layout.namespace) == expected_letters(written, new)
    assert await limits_everywhere(redis, layout.namespace) == expected_limits(new)
    assert await recorded(redis, layout.namespace) == 4


async def test_a_change_stopped_before_recording_finishes_when_run_again(
    redis: aioredis.Redis, layout: Layout
) -> None:
    """Everything moved and the old partitions cleared, the count not yet recorded: a
    second run finds nothing left (streams and groups gone read as empty) and records it."""
    written = await drained_state(redis, layout)
    new = Layout(layout.namespace, 1)  # no old tag is kept
    mover = repartition.LetterMove(redis, new)
    for keys in layout:
        await repartition.move_limits(redis, keys, new)
        await mover.run(keys)
    for keys in layout:
        await repartition.clear(redis, keys, new)
        assert not await redis.exists(keys.stream)
    assert await recorded(redis, layout.namespace) == 2
    outcome = await repartition.change(redis, layout.namespace, current=2, target=1)
    assert (outcome.status, outcome.limits, outcome.letters) == ("changed", 0, 0)
    assert await recorded(redis, layout.namespace) == 1
    assert await letters_everywhere(redis, layout.namespace) == expected_letters(written, new)
    assert await limits_everywhere(redis, layout.namespace) == expected_limits(new)


async def test_to_one_partition_and_back(redis: aioredis.Redis, layout: Layout) -> None:
    """2 -> 1 gathers everything under the namespace's own tag; 1 -> 3 spreads it again."""
    written = await drained_state(redis, layout)
    for count in (1, 3):
        current = await recorded(redis, layout.namespace)
        assert current is not None
        outcome = await repartition.change(redis, layout.namespace, current=current, target=count)
        assert outcome.status == "changed"
        now = Layout(layout.namespace, count)
        assert await letters_everywhere(redis, layout.namespace) == expected_letters(written, now)
        assert await limits_everywhere(redis, layout.namespace) == expected_limits(now)


async def test_the_command_line(
    redis: aioredis.Redis, layout: Layout, settings: Settings, tmp_path: Path
) -> None:
    """``partitions`` shows the layout; ``set`` refuses without --yes off a terminal (2),
    refuses while a consumer lives (1, naming it), then changes the count (0)."""
    written = await drained_state(redis, layout)
    env = environment(settings, STREAMREC_NAMESPACE=layout.namespace, STREAMREC_PARTITIONS="2")
    shown = await streamrec("partitions", "--json", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert [p["stream"] for p in report["partitions"]] == [k.stream for k in layout]
    unconfirmed = await streamrec("partitions", "set", "4", env=env, cwd=tmp_path)
    assert unconfirmed.returncode == 2, unconfirmed.stderr
    assert "--yes" in unconfirmed.stderr
    await live_consumer(redis, layout, "worker-7")
    refused = await streamrec("partitions", "set", "4", "--yes", env=env, cwd=tmp_path)
    assert refused.returncode == 1, refused.stderr
    assert "consumers alive: worker-7" in refused.stderr
    assert await recorded(redis, layout.namespace) == 2
    await redis.delete(layout.home.consumers)
    changed = await streamrec("partitions", "set", "4", "--yes", env=env, cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert "2 -> 4" in changed.stdout
    assert await recorded(redis, layout.namespace) == 4
    new = Layout(layout.namespace, 4)
    assert await letters_everywhere(redis, layout.namespace) == expected_letters(written, new)
    env["STREAMREC_PARTITIONS"] = "4"
    shown = await streamrec("partitions", "show", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "4 partitions recorded, 4 configured" in shown.stdout
    for keys in new:
        assert keys.stream in shown.stdout
