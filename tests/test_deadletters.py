"""Dead letters: listing, replaying and purging them, through the API and ``streamrec dlq``,
with one partition and with four."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from streamrec import deadletters, service
from streamrec.events import RecordingEvent
from streamrec.keys import Keys
from streamrec.partitions import Layout
from streamrec.producer import Enqueuer
from streamrec.settings import Settings
from tests.conftest import entries
from tests.processes import environment, streamrec
from tests.standins import ACCOUNT_SID, MediaStandIn, call_sid, recording_sid
from tests.test_status import PARTS, dead_fields, partitioned


async def enqueue(redis: aioredis.Redis, keys: Keys, *, business: str = "7") -> str:
    """Add one completed-recording event as the webhook does; returns its RecordingSid."""
    event = RecordingEvent.create(
        recording_sid=recording_sid(),
        call_sid=call_sid(),
        account_sid=ACCOUNT_SID,
        business_id=business,
        status="completed",
        duration_s="42",
    )
    added, _ = await Enqueuer(redis, keys, dedupe_ttl_s=600).enqueue(event)
    assert added
    return event.recording_sid


async def consume_all(settings: Settings) -> None:
    await asyncio.wait_for(service.consume(settings, asyncio.Event(), until_idle=True), 60)


async def rows(db: Any) -> dict[str, Any]:
    return {r["recording_sid"]: r for r in await db.fetch("SELECT * FROM recordings")}


async def dead_recordings(
    redis: aioredis.Redis, keys: Keys, settings: Settings, media: MediaStandIn, count: int
) -> list[str]:
    """``count`` recordings the media endpoint refuses (403), consumed into dead letters."""
    sids = [await enqueue(redis, keys) for _ in range(count)]
    for sid in sids:
        media.status_for[sid] = 403
    await consume_all(settings)
    return sids


async def add_dead(redis: aioredis.Redis, keys: Keys, count: int) -> list[str]:
    """``count`` stream entries (ids 1-0, 1-1, ...) moved to the dead letters as a consumer
    moves them; returns the dead letters' ids."""
    for n in range(count):
        fields = {"v": "1", "recording_sid": f"RE{n:032x}", "business_id": "9"}
        await redis.xadd(keys.stream, fields, id=f"1-{n}")  # type: ignore[arg-type]
        assert await deadletters.move(
            redis,
            keys,
            entry_id=f"1-{n}",
            fields=fields,
            error=f"PermanentError: media request got 40{n}",
            attempts=n + 1,
            consumer="worker-a",
        )
    return [entry_id for entry_id, _ in await entries(redis, keys.dead)]


async def test_replayed_dead_recording_completes_once(
    redis: aioredis.Redis,
    keys: Keys,
    settings: Settings,
    media: MediaStandIn,
    db: Any,
    tmp_path: Path,
) -> None:
    """A recording dead-lettered by a 403 completes once after ``dlq replay <id>``."""
    [sid] = await dead_recordings(redis, keys, settings, media, 1)
    [(dead_id, dead)] = await entries(redis, keys.dead)
    assert dead["recording_sid"] == sid
    assert "403" in dead["error"]
    assert (await rows(db))[sid]["status"] == "failed"

    del media.status_for[sid]  # the cause is fixed
    finished = await streamrec("dlq", "replay", dead_id, env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith(f"{dead_id} -> ")
    await consume_all(settings)

    found = await rows(db)
    assert list(found) == [sid]
    assert found[sid]["status"] == "completed"
    assert found[sid]["error"] is None
    assert found[sid]["transcript"] == f"transcript of {sid}"
    assert media.served[sid] == 1
    assert await redis.xlen(keys.dead) == 0
    assert await redis.xlen(keys.stream) == 0


async def test_replay_all_replays_every_dead_letter(
    redis: aioredis.Redis,
    keys: Keys,
    settings: Settings,
    media: MediaStandIn,
    db: Any,
    tmp_path: Path,
) -> None:
    """``dlq replay --all`` puts every dead recording back; all of them then complete."""
    sids = await dead_recordings(redis, keys, settings, media, 4)
    assert await redis.xlen(keys.dead) == 4
    for sid in sids:
        del media.status_for[sid]
    finished = await streamrec("dlq", "replay", "--all", env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "replayed 4"
    assert await redis.xlen(keys.dead) == 0
    await consume_all(settings)
    found = await rows(db)
    assert set(found) == set(sids)
    assert {row["status"] for row in found.values()} == {"completed"}
    assert await redis.xlen(keys.stream) == 0


async def test_replay_all_works_through_batches(redis: aioredis.Redis, keys: Keys) -> None:
    """replay_all with a batch smaller than the dead letters replays them all, in order."""
    await add_dead(redis, keys, 5)
    assert await deadletters.replay_all(redis, Layout(keys.namespace), batch=2) == 5
    assert await redis.xlen(keys.dead) == 0
    replayed = [fields["recording_sid"] for _, fields in await entries(redis, keys.stream)]
    assert replayed == [f"RE{n:032x}" for n in range(5)]


async def test_dlq_list_shows_fields_error_and_attempts(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``dlq list`` and ``dlq list --json`` show each dead letter's fields, error, attempts."""
    ids = await add_dead(redis, keys, 2)
    env = environment(settings)

    as_json = await streamrec("dlq", "list", "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    listed = json.loads(as_json.stdout)
    assert [letter["id"] for letter in listed] == ids
    for n, letter in enumerate(listed):
        assert letter["fields"] == {"v": "1", "recording_sid": f"RE{n:032x}", "business_id": "9"}
        assert letter["error"] == f"PermanentError: media request got 40{n}"
        assert letter["attempts"] == n + 1
        assert letter["origin_id"] == f"1-{n}"
        assert letter["consumer"] == "worker-a"
        assert letter["failed_at_ms"] > 0

    plain = await streamrec("dlq", "list", env=env, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    for n, dead_id in enumerate(ids):
        assert dead_id in plain.stdout
        assert f"attempts {n + 1}" in plain.stdout
        assert f"error: PermanentError: media request got 40{n}" in plain.stdout
        assert f"recording_sid=RE{n:032x}" in plain.stdout

    first = await streamrec("dlq", "list", "--json", "--count", "1", env=env, cwd=tmp_path)
    assert [letter["id"] for letter in json.loads(first.stdout)] == ids[:1]


async def test_dlq_list_of_no_dead_letters(
    redis: aioredis.Redis, settings: Settings, tmp_path: Path
) -> None:
    """``dlq list`` with nothing dead says so; ``--json`` prints an empty list."""
    env = environment(settings)
    plain = await streamrec("dlq", "list", env=env, cwd=tmp_path)
    assert (plain.returncode, plain.stdout.strip()) == (0, "no dead letters")
    as_json = await streamrec("dlq", "list", "--json", env=env, cwd=tmp_path)
    assert (as_json.returncode, json.loads(as_json.stdout)) == (0, [])


async def test_purge_without_yes_and_without_a_tty_deletes_nothing(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``dlq purge`` with no --yes and no terminal to ask on exits 2 and deletes nothing."""
    await add_dead(redis, keys, 3)
    env = environment(settings)
    for args in (("dlq", "purge"), ("dlq", "purge", "1-0")):
        finished = await streamrec(*args, env=env, cwd=tmp_path)
        assert finished.returncode == 2
        assert "--yes" in finished.stderr
        assert await redis.xlen(keys.dead) == 3


async def test_purge_with_yes_deletes_them_all(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``dlq purge --yes`` deletes every dead letter and says how many."""
    await add_dead(redis, keys, 3)
    finished = await streamrec("dlq", "purge", "--yes", env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "deleted 3"
    assert await redis.xlen(keys.dead) == 0


async def test_purge_with_ids_deletes_only_those(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path
) -> None:
    """``dlq purge --yes ID ID`` deletes those two dead letters and keeps the others."""
    ids = await add_dead(redis, keys, 4)
    finished = await streamrec(
        "dlq", "purge", "--yes", ids[0], ids[2], env=environment(settings), cwd=tmp_path
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "deleted 2"
    assert [entry_id for entry_id, _ in await entries(redis, keys.dead)] == [ids[1], ids[3]]


@pytest.mark.parametrize("bad", ["1-999", "not-an-id"], ids=["unknown", "malformed"])
async def test_replay_of_a_bad_id_exits_1_and_still_moves_the_others(
    redis: aioredis.Redis, keys: Keys, settings: Settings, tmp_path: Path, bad: str
) -> None:
    """``dlq replay KNOWN BAD`` replays KNOWN, says so, names BAD as unknown and exits 1."""
    [known] = await add_dead(redis, keys, 1)
    finished = await streamrec("dlq", "replay", known, bad, env=environment(settings), cwd=tmp_path)
    assert finished.returncode == 1
    assert f"{known} -> " in finished.stdout
    assert f"{bad}: no such dead letter" in finished.stdout
    assert await redis.xlen(keys.dead) == 0
    assert await redis.xlen(keys.stream) == 1


async def test_replay_leaves_each_entry_in_exactly_one_stream(
    redis: aioredis.Redis, keys: Keys
) -> None:
    """After replay each letter is on the stream (original fields only) or still dead, not both."""
    ids = await add_dead(redis, keys, 3)
    moved = await deadletters.replay(redis, keys, [ids[0], ids[2], "1-999"])
    assert list(moved) == [ids[0], ids[2], "1-999"]
    assert moved["1-999"] is None
    on_stream = dict(await entries(redis, keys.stream))
    still_dead = dict(await entries(redis, keys.dead))
    assert list(still_dead) == [ids[1]]
    assert set(on_stream) == {moved[ids[0]], moved[ids[2]]}
    for n in (0, 2):
        new_id = moved[ids[n]]
        assert new_id is not None
        assert ids[n] not in still_dead
        assert on_stream[new_id] == {
            "v": "1",
            "recording_sid": f"RE{n:032x}",
            "business_id": "9",
        }
    assert await redis.xlen(keys.stream) == 2


async def test_replay_takes_only_exact_dead_letter_ids(redis: aioredis.Redis, keys: Keys) -> None:
    """An id that is no dead letter's exact id (ms only, malformed) moves nothing, even in part."""
    for seq in range(2):
        await redis.xadd(keys.dead, {"v": "1", "n": str(seq), "error": "boom"}, id=f"5-{seq}")
    assert (await deadletters.replay(redis, keys, ["5-0"]))["5-0"] is not None
    # "5" is a range to XRANGE (5-0 .. 5-max), which now starts at 5-1.
    assert await deadletters.replay(redis, keys, ["5", "not-an-id"]) == {
        "5": None,
        "not-an-id": None,
    }
    assert [i for i, _ in await entries(redis, keys.dead)] == ["5-1"]
    assert [f["n"] for _, f in await entries(redis, keys.stream)] == ["0"]


async def test_a_repeated_move_writes_one_dead_letter(redis: aioredis.Redis, keys: Keys) -> None:
    """A move run again (its reply lost) adds no second dead letter and still answers True."""
    entry_id = str(await redis.xadd(keys.stream, {"v": "1", "n": "0"}))
    await redis.xgroup_create(keys.stream, keys.group, id="0")
    await redis.xreadgroup(keys.group, "worker-a", {keys.stream: ">"})
    move = functools.partial(
        deadletters.move,
        redis,
        keys,
        entry_id=entry_id,
        fields={"v": "1", "n": "0"},
        error="PermanentError: boom",
        attempts=1,
    )
    assert await move(consumer="worker-a")
    assert await move(consumer="worker-a")  # the same call again: it recognises its move
    [(_, dead)] = await entries(redis, keys.dead)
    assert (dead["origin_id"], dead["consumer"], dead["n"]) == (entry_id, "worker-a", "0")
    assert not await move(consumer="worker-b")  # another consumer's move finds it gone
    assert await redis.xlen(keys.dead) == 1
    assert await redis.xlen(keys.stream) == 0
    assert (await redis.xpending(keys.stream, keys.group))["pending"] == 0


async def test_a_repeated_replay_returns_the_same_new_id(redis: aioredis.Redis, keys: Keys) -> None:
    """Replaying a dead letter twice (a reply lost) answers the same new id and adds one entry."""
    [dead_id] = await add_dead(redis, keys, 1)
    first = await deadletters.replay(redis, keys, [dead_id])
    again = await deadletters.replay(redis, keys, [dead_id])
    assert first[dead_id] is not None
    assert again == first
    assert [entry_id for entry_id, _ in await entries(redis, keys.stream)] == [first[dead_id]]
    assert await redis.xlen(keys.dead) == 0


async def test_replay_all_leaves_letters_that_arrive_meanwhile(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """replay_all replays the letters there were at its start, not those its replays create."""
    await add_dead(redis, keys, 3)
    replay, failed_again = deadletters.replay, set()

    async def replay_then_fail_again(
        redis: aioredis.Redis, keys: Keys, ids: list[str]
    ) -> dict[str, str | None]:
        """The replay, then each replayed recording failing once more, as a broken cause does."""
        moved = await replay(redis, keys, ids)
        for new_id in moved.values():
            assert new_id is not None
            [(_, fields)] = [e for e in await entries(redis, keys.stream) if e[0] == new_id]
            if fields["recording_sid"] in failed_again:
                continue
            failed_again.add(fields["recording_sid"])
            assert await deadletters.move(
                redis, keys, entry_id=new_id, fields=fields, error="again", attempts=1,
                consumer="worker-b",
            )  # fmt: skip
        return moved

    monkeypatch.setattr(deadletters, "replay", replay_then_fail_again)
    assert await deadletters.replay_all(redis, Layout(keys.namespace), batch=2) == 3
    again = await entries(redis, keys.dead)
    assert [fields["error"] for _, fields in again] == ["again"] * 3
    assert [fields["recording_sid"] for _, fields in again] == [f"RE{n:032x}" for n in range(3)]


@pytest_asyncio.fixture(loop_scope="session")
async def layout(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[Layout]:
    """Four partitions of this test's namespace."""
    async with partitioned(redis, keys) as made:
        yield made


async def put_dead(redis: aioredis.Redis, layout: Layout, placed: dict[int, list[str]]) -> None:
    """Dead letters with the given ids in the given partitions, numbered in the order given,
    each of a business of its own partition."""
    n = 0
    for index, ids in placed.items():
        business = next(f"b{i}" for i in range(1000) if layout.of(f"b{i}").partition == index)
        for entry_id in ids:
            fields = dead_fields(n, business)
            await redis.xadd(layout.partitions[index].dead, fields, id=entry_id)  # type: ignore[arg-type]
            n += 1


async def test_listing_merges_the_partitions_by_entry_id(
    redis: aioredis.Redis, layout: Layout
) -> None:
    """Dead letters of every partition are listed oldest first by id (the Redis time each
    was written), each with its partition; ``count`` and ``newest`` apply to the merge."""
    await put_dead(redis, layout, {0: ["3-0"], 1: ["1-0", "4-0"], 3: ["2-0"]})
    listed = await deadletters.listing(redis, layout)
    assert [(d.partition, d.id) for d in listed] == [(1, "1-0"), (3, "2-0"), (0, "3-0"), (1, "4-0")]
    assert [d.ref for d in await deadletters.listing(redis, layout, count=2)] == ["1/1-0", "3/2-0"]
    newest = await deadletters.listing(redis, layout, count=3, newest=True)
    assert [d.ref for d in newest] == ["1/4-0", "0/3-0", "3/2-0"]
    assert await deadletters.total(redis, layout) == 4


async def test_dlq_list_names_each_letter_with_its_partition(
    redis: aioredis.Redis, layout: Layout, settings: Settings, tmp_path: Path
) -> None:
    """``dlq list --json`` gives each letter's ``partition``; the text names each as
    ``<partition>/<id>``, as replay takes it."""
    await put_dead(redis, layout, {2: ["1-0"], 3: ["2-0"]})
    env = environment(settings, STREAMREC_PARTITIONS=str(PARTS))
    as_json = await streamrec("dlq", "list", "--json", env=env, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    listed = json.loads(as_json.stdout)
    assert [(d["partition"], d["id"]) for d in listed] == [(2, "1-0"), (3, "2-0")]
    plain = await streamrec("dlq", "list", env=env, cwd=tmp_path)
    firsts = [line.split()[0] for line in plain.stdout.splitlines() if not line.startswith(" ")]
    assert firsts == ["2/1-0", "3/2-0"]


async def test_replay_puts_each_letter_back_on_its_own_partitions_stream(
    redis: aioredis.Redis, layout: Layout, settings: Settings, tmp_path: Path
) -> None:
    """``dlq replay 3/2-0 4-0`` replays the first where it says and finds the bare id in
    the one partition holding it; each lands on its own partition's stream."""
    await put_dead(redis, layout, {1: ["4-0"], 3: ["2-0", "4-1"]})
    env = environment(settings, STREAMREC_PARTITIONS=str(PARTS))
    finished = await streamrec("dlq", "replay", "3/2-0", "4-0", env=env, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    on = {i: await entries(redis, layout.partitions[i].stream) for i in range(PARTS)}
    assert [len(on[i]) for i in range(PARTS)] == [0, 1, 0, 1]
    [(new_3, fields_3)] = on[3]
    [(new_1, fields_1)] = on[1]
    assert finished.stdout.splitlines() == [f"3/2-0 -> 3/{new_3}", f"4-0 -> 1/{new_1}"]
    assert layout.of(fields_3["business_id"]).partition == 3
    assert layout.of(fields_1["business_id"]).partition == 1
    assert [i for i, _ in await entries(redis, layout.partitions[3].dead)] == ["4-1"]
    assert await redis.xlen(layout.partitions[1].dead) == 0


async def test_a_bare_id_in_two_partitions_is_refused(
    redis: aioredis.Redis, layout: Layout, settings: Settings, tmp_path: Path
) -> None:
    """A bare id two partitions hold is refused by replay and purge (exit 2, its qualified
    forms named, nothing moved or deleted); a qualified one then does what it says."""
    await put_dead(redis, layout, {0: ["5-0"], 2: ["5-0", "6-0"]})
    env = environment(settings, STREAMREC_PARTITIONS=str(PARTS))
    for args in (("dlq", "replay", "6-0", "5-0"), ("dlq", "purge", "--yes", "5-0")):
        refused = await streamrec(*args, env=env, cwd=tmp_path)
        assert refused.returncode == 2, refused.stdout
        assert "5-0: 0/5-0 or 2/5-0" in refused.stderr
        assert await deadletters.total(redis, layout) == 3
        assert await redis.xlen(layout.partitions[2].stream) == 0

    finished = await streamrec("dlq", "replay", "2/5-0", env=env, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    [(new_id, _)] = await entries(redis, layout.partitions[2].stream)
    assert finished.stdout.strip() == f"2/5-0 -> 2/{new_id}"
    assert [i for i, _ in await entries(redis, layout.partitions[0].dead)] == ["5-0"]


async def test_unknown_and_malformed_names_are_no_such_dead_letter(
    redis: aioredis.Redis, layout: Layout
) -> None:
    """A partition past the last, an id no partition holds, a malformed name: each is
    unknown, and the known one among them is still replayed."""
    await put_dead(redis, layout, {1: ["1-0"]})
    asked = ["9/1-0", "2-0", "1/x", "1", "1-0"]
    moved = await deadletters.replay_refs(redis, layout, asked)
    assert [moved[ref] is None for ref in asked] == [True, True, True, True, False]
    [(new_id, _)] = await entries(redis, layout.partitions[1].stream)
    assert moved["1-0"] == (1, new_id)


async def test_replay_all_and_purge_go_over_every_partition(
    redis: aioredis.Redis, layout: Layout, settings: Settings, tmp_path: Path
) -> None:
    """``dlq replay --all`` puts every partition's letters back on their own streams;
    ``dlq purge --yes`` then deletes every partition's new ones."""
    placed = {0: ["1-0", "2-0"], 2: ["1-0"], 3: ["3-0"]}
    await put_dead(redis, layout, placed)
    env = environment(settings, STREAMREC_PARTITIONS=str(PARTS))
    replayed = await streamrec("dlq", "replay", "--all", env=env, cwd=tmp_path)
    assert (replayed.returncode, replayed.stdout.strip()) == (0, "replayed 4")
    lengths = [await redis.xlen(keys.stream) for keys in layout]
    assert lengths == [len(placed.get(i, [])) for i in range(PARTS)]
    assert await deadletters.total(redis, layout) == 0

    later = {0: ["11-0", "12-0"], 2: ["11-0"], 3: ["13-0"]}  # ids past the replayed ones
    await put_dead(redis, layout, later)
    purged = await streamrec("dlq", "purge", "--yes", env=env, cwd=tmp_path)
    assert (purged.returncode, purged.stdout.strip()) == (0, "deleted 4")
    assert await deadletters.total(redis, layout) == 0
    await put_dead(redis, layout, later)
    some = await streamrec("dlq", "purge", "--yes", "0/12-0", "13-0", env=env, cwd=tmp_path)
    assert (some.returncode, some.stdout.strip()) == (0, "deleted 2")
    remaining = await deadletters.listing(redis, layout)
    assert [d.ref for d in remaining] == ["0/11-0", "2/11-0"]
