"""Per-business transcription settings (the ``business_settings`` table) and their command.

A business's profile is its own settings over the process's defaults
(``STREAMREC_TRANSCRIBE_MODE``, ``_MODEL``, ``_LANGUAGE``, ``_CHANNELS``): a NULL
column means "the default", so a business follows a changed default unless it
set that field itself. The pipeline reads the profile for each recording, one
query and no cache, so a change reaches every replica with its next recording.
A field goes back to the default with ``unset`` (a NULL again); ``delete``
puts every field back. A business's language ``auto`` asks the model to
detect it even where the default names one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, get_args

import asyncpg

from streamrec import schema
from streamrec.events import BUSINESS_ID_RULE, is_business_id
from streamrec.logging import redact
from streamrec.retry import PermanentError, TransientError, Unavailable, describe
from streamrec.settings import Settings
from streamrec.store import PROBE_TIMEOUT_S

Mode = Literal["transcribe", "download-only"]
Channels = Literal["split", "mixed"]
Field = Literal["mode", "model", "language", "channels", "speakers"]
AUTO = "auto"
"""A business's language that asks the model to detect it (NULL means the default's)."""
MODES: tuple[str, ...] = get_args(Mode)
CHANNELS: tuple[str, ...] = get_args(Channels)
FIELDS: tuple[Field, ...] = get_args(Field)

RULES: dict[str, tuple[re.Pattern[str], str]] = {
    "mode": (re.compile(r"^(transcribe|download-only)$"), "transcribe or download-only"),
    "model": (re.compile(r"^[A-Za-z0-9_.:-]{1,64}$"), "1-64 of A-Z a-z 0-9 _ . : -"),
    "language": (
        re.compile(r"^([a-z]{2,3}|auto)$"),
        "an ISO-639 code of 2-3 lower-case letters (he), or auto (detected)",
    ),
    "channels": (re.compile(r"^(split|mixed)$"), "split or mixed"),
}
"""What each text setting must match (the table's CHECKs say the same), and the rule in words."""
SPEAKER_MAX_CHARS = 32
T = TypeVar("T")


class InvalidSetting(ValueError):
    """A business id or setting the table does not take; the message says the rule."""


@dataclass(frozen=True, slots=True)
class Profile:
    """How one business's recordings are transcribed (its settings over the defaults)."""

    mode: Mode
    model: str
    language: str | None
    """ISO-639 code sent to the API; None: the model detects the language."""
    channels: Channels
    speakers: tuple[str, str] | None
    """Labels of the first and second channel; None: labels from Twilio's RecordingSource."""

    @classmethod
    def defaults(cls, settings: Settings) -> Profile:
        """The profile of a business with no settings of its own (see ``default_profile``)."""
        return default_profile(settings)


def default_profile(settings: Settings) -> Profile:
    """The process's defaults, from the STREAMREC_TRANSCRIBE_* settings.

    A function of the module, not only ``Profile.defaults``, so that a command's
    ``--help`` finds the settings it reads (``streamrec.reads`` follows functions).
    """
    return Profile(
        mode=settings.transcribe_mode,
        model=settings.transcribe_model,
        language=settings.transcribe_language,
        channels=settings.transcribe_channels,
        speakers=None,
    )


@dataclass(frozen=True, slots=True)
class Entry:
    """A business's effective profile, which of its fields are its own, and since when."""

    business_id: str
    profile: Profile
    own: frozenset[Field]
    """The fields set for this business; the others are the defaults."""
    updated_at: datetime | None
    """When its settings last changed; None: it has none of its own."""


def check_business_id(value: str) -> str:
    """``value`` if it is a business id, else InvalidSetting saying the rule."""
    if not is_business_id(value):
        raise InvalidSetting(f"{value!r} is not a business id ({BUSINESS_ID_RULE})")
    return value


def check(field: str, value: str) -> str:
    """``value`` if it is a valid ``field`` (mode, model, language, channels), else
    InvalidSetting saying the rule."""
    pattern, rule = RULES[field]
    if not pattern.fullmatch(value):
        raise InvalidSetting(f"{field} {value!r} is not {rule}")
    return value


def check_speakers(labels: Iterable[str]) -> tuple[str, str]:
    """Two different, non-empty, printable labels of at most 32 characters, else InvalidSetting."""
    pair = tuple(labels)
    if len(pair) != 2 or pair[0] == pair[1]:
        raise InvalidSetting(f"speakers {pair!r} are not two different labels")
    for label in pair:
        if not label.strip() or len(label) > SPEAKER_MAX_CHARS or not label.isprintable():
            raise InvalidSetting(
                f"speaker {label!r} is not 1-{SPEAKER_MAX_CHARS} printable characters"
            )
    return pair[0], pair[1]


def parse_speakers(text: str) -> tuple[str, str]:
    """``"customer,agent"``: the first channel's label, then the second's (spaces trimmed)."""
    return check_speakers(label.strip() for label in text.split(","))


@contextlib.asynccontextmanager
async def _sorted_errors(pool: Any) -> AsyncIterator[None]:
    """A failed statement as ``streamrec.store`` sorts them: PermanentError for data the
    database refuses (SQLSTATE class 22 or 23), Unavailable when ``SELECT 1`` fails too,
    else the error itself."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, asyncpg.PostgresError) and str(exc.sqlstate)[:2] in {"22", "23"}:
            raise PermanentError(f"PostgreSQL refused the settings: {describe(exc)}") from exc
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await pool.fetchval("SELECT 1")
        except Exception:  # whatever stops SELECT 1 stops every statement
            raise Unavailable(f"PostgreSQL unavailable: {describe(exc)}") from exc
        raise


COLUMNS = "business_id, mode, model, language, channels, speakers, updated_at"
SET = f"""
INSERT INTO business_settings AS b (business_id, mode, model, language, channels, speakers)
VALUES ($1, $2, $3, $4, $5, $6::text[])
ON CONFLICT (business_id) DO UPDATE SET
    mode = COALESCE(EXCLUDED.mode, b.mode),
    model = COALESCE(EXCLUDED.model, b.model),
    language = COALESCE(EXCLUDED.language, b.language),
    channels = COALESCE(EXCLUDED.channels, b.channels),
    speakers = COALESCE(EXCLUDED.speakers, b.speakers),
    updated_at = now()
RETURNING {COLUMNS}
"""  # noqa: S608  # COLUMNS is a constant; every value is a parameter
UNSET = f"""
UPDATE business_settings SET
    mode = CASE WHEN 'mode' = ANY($2::text[]) THEN NULL ELSE mode END,
    model = CASE WHEN 'model' = ANY($2::text[]) THEN NULL ELSE model END,
    language = CASE WHEN 'language' = ANY($2::text[]) THEN NULL ELSE language END,
    channels = CASE WHEN 'channels' = ANY($2::text[]) THEN NULL ELSE channels END,
    speakers = CASE WHEN 'speakers' = ANY($2::text[]) THEN NULL ELSE speakers END,
    updated_at = now()
WHERE business_id = $1
RETURNING {COLUMNS}
"""  # noqa: S608  # as SET


class Businesses:
    """The business_settings table over an asyncpg pool (or connection) owned by the caller.

    Every method checks its arguments first and raises InvalidSetting, before any
    SQL, for a bad one; a failed statement raises PermanentError (the database
    refused a value), Unavailable (it cannot be reached) or the driver's error.
    """

    def __init__(self, pool: Any, *, defaults: Profile) -> None:
        self._pool = pool
        self.defaults = defaults

    async def profile(self, business_id: str) -> Profile:
        """The profile a recording of ``business_id`` is transcribed with. One query."""
        return (await self.entry(business_id)).profile

    async def entry(self, business_id: str) -> Entry:
        """``business_id``'s profile and which fields are its own (none: no row)."""
        check_business_id(business_id)
        async with _sorted_errors(self._pool):
            row = await self._pool.fetchrow(
                f"SELECT {COLUMNS} FROM business_settings WHERE business_id = $1",  # noqa: S608
                business_id,
            )
        return self._entry(row) if row else Entry(business_id, self.defaults, frozenset(), None)

    async def set(
        self,
        business_id: str,
        *,
        mode: str | None = None,
        model: str | None = None,
        language: str | None = None,
        channels: str | None = None,
        speakers: Iterable[str] | None = None,
    ) -> Entry:
        """Give ``business_id`` the fields given (None: leave as is); returns its entry after.

        At least one field; the others keep their own value or default.
        """
        check_business_id(business_id)
        texts = {"mode": mode, "model": model, "language": language, "channels": channels}
        values: list[object] = [None if v is None else check(f, v) for f, v in texts.items()]
        values.append(None if speakers is None else list(check_speakers(speakers)))
        if all(value is None for value in values):
            raise InvalidSetting(f"nothing to set: give at least one of {', '.join(FIELDS)}")
        async with _sorted_errors(self._pool):
            row = await self._pool.fetchrow(SET, business_id, *values)
        return self._entry(row)

    async def unset(self, business_id: str, fields: Iterable[str]) -> Entry | None:
        """Put ``fields`` of ``business_id`` back to the defaults; returns its entry after,
        or None if it had no settings of its own. Its row stays (``delete`` removes it)."""
        check_business_id(business_id)
        names = list(dict.fromkeys(fields))
        if not names or not set(names) <= set(FIELDS):
            raise InvalidSetting(f"fields {names!r} are not some of {', '.join(FIELDS)}")
        async with _sorted_errors(self._pool):
            row = await self._pool.fetchrow(UNSET, business_id, names)
        return self._entry(row) if row else None

    async def delete(self, business_id: str) -> bool:
        """Put every field of ``business_id`` back to the defaults; False if none was its own."""
        check_business_id(business_id)
        async with _sorted_errors(self._pool):
            status = await self._pool.execute(
                "DELETE FROM business_settings WHERE business_id = $1", business_id
            )
        return str(status) != "DELETE 0"

    async def listing(self) -> list[Entry]:
        """Every business with settings of its own, by id, with its effective profile."""
        async with _sorted_errors(self._pool):
            rows = await self._pool.fetch(
                f"SELECT {COLUMNS} FROM business_settings ORDER BY business_id"  # noqa: S608
            )
        return [self._entry(row) for row in rows]

    def _entry(self, row: Any) -> Entry:
        own = frozenset(field for field in FIELDS if row[field] is not None)
        values = {field: row[field] for field in own}
        if values.get("language") == AUTO:
            values["language"] = None  # detected, whatever the default says
        if "speakers" in values:
            values["speakers"] = tuple(values["speakers"])
        profile = dataclasses.replace(self.defaults, **values)
        return Entry(row["business_id"], profile, own, row["updated_at"])


# The command line: ``python -m streamrec businesses ACTION``.


OPTIONS: dict[Field, tuple[str, str]] = {
    "mode": ("|".join(MODES), "transcribe, or only download and store the audio"),
    "model": ("MODEL", "transcription model (gpt-4o-transcribe, whisper-1)"),
    "language": ("CODE", "ISO-639 code sent to the API (he, en); auto: detected"),
    "channels": ("|".join(CHANNELS), "split: a speaker a channel; mixed: one track"),
    "speakers": ("FIRST,SECOND", "labels of the first and second channel"),
}
"""``businesses set``'s options: as shown in its help, and what each means."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``businesses`` command's actions and options."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    business = _argument(check_business_id)
    change = _action(actions, "set", "give a business settings of its own (any of the options)")
    change.add_argument("business_id", type=business)
    for field, (metavar, meaning) in OPTIONS.items():
        parse = parse_speakers if field == "speakers" else functools.partial(check, field)
        change.add_argument(f"--{field}", type=_argument(parse), metavar=metavar, help=meaning)
    unset = _action(actions, "unset", "put the named settings of a business back to the defaults")
    unset.add_argument("business_id", type=business)
    for field in FIELDS:
        unset.add_argument(f"--{field}", dest="fields", action="append_const", const=field,
                           help=f"{field} back to the default")  # fmt: skip
    delete = _action(actions, "delete", "put every setting of a business back to the defaults")
    delete.add_argument("business_id", type=business)
    show = _action(actions, "show", "a business's effective settings, defaults marked")
    show.add_argument("business_id", type=business)
    listing = _action(actions, "list", "the defaults and each business with settings of its own")
    listing.add_argument("--json", action="store_true", help="one JSON document")


def _action(
    actions: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
) -> argparse.ArgumentParser:
    return actions.add_parser(name, help=summary, description=summary)


def _argument(check: Callable[[str], T]) -> Callable[[str], T]:
    """``check`` as an argparse type: its InvalidSetting becomes exit 2 with its message."""

    def parse(value: str) -> T:
        try:
            return check(value)
        except InvalidSetting as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


async def command(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``businesses ACTION``: 0 done; 1 nothing to change, or PostgreSQL failed; 2 usage."""
    await schema.migrate(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        table = Businesses(conn, defaults=default_profile(settings))
        if args.action == "list":
            print(render_listing(table.defaults, await table.listing(), as_json=args.json))
            return 0
        return await _change(table, args)
    except InvalidSetting as exc:
        print(f"streamrec: {exc}", file=sys.stderr)
        return 2
    except (PermanentError, TransientError) as exc:
        print(f"streamrec: businesses failed: {redact(str(exc))}", file=sys.stderr)
        return 1
    finally:
        await conn.close()


async def _change(table: Businesses, args: argparse.Namespace) -> int:
    """``set``, ``unset``, ``delete`` or ``show``; prints the business's profile after."""
    changed = True
    if args.action == "set":
        await table.set(args.business_id, **{field: getattr(args, field) for field in FIELDS})
    elif args.action == "unset":
        if not args.fields:
            raise InvalidSetting(f"say which to unset: {' '.join(f'--{f}' for f in FIELDS)}")
        changed = await table.unset(args.business_id, args.fields) is not None
    elif args.action == "delete":
        changed = await table.delete(args.business_id)
    if not changed:
        print(f"streamrec: {args.business_id} has no settings of its own", file=sys.stderr)
        return 1
    print(render([await table.entry(args.business_id)]))
    return 0


DEFAULT_MARK = " (default)"
HEADER = ("business", "mode", "model", "language", "channels", "speakers", "updated")


def shown(field: Field, profile: Profile) -> str:
    """A field's value as the table shows it (and as ``set`` takes it)."""
    value = getattr(profile, field)
    if field == "language" and value is None:
        return "detected"
    if field == "speakers":
        return "by source" if value is None else ",".join(value)
    return str(value)


def render(entries: Iterable[Entry]) -> str:
    """One row per business, values that come from the defaults marked "(default)"."""
    rows: list[tuple[str, ...]] = [HEADER]
    for e in entries:
        values = [shown(f, e.profile) + ("" if f in e.own else DEFAULT_MARK) for f in FIELDS]
        when = e.updated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if e.updated_at else "-"
        rows.append((e.business_id, *values, when))
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render_listing(defaults: Profile, entries: list[Entry], *, as_json: bool = False) -> str:
    """``businesses list``: the defaults, then the table (or one JSON document)."""
    if as_json:
        return json.dumps(
            {
                "defaults": dataclasses.asdict(defaults),
                "businesses": [
                    {"business_id": e.business_id, **dataclasses.asdict(e.profile),
                     "defaults": [f for f in FIELDS if f not in e.own],
                     "updated_at": e.updated_at.isoformat() if e.updated_at else None}
                    for e in entries
                ],
            },
            indent=2,
        )  # fmt: skip
    line = "defaults: " + ", ".join(f"{f} {shown(f, defaults)}" for f in FIELDS)
    if not entries:
        return f"{line}\nno business has settings of its own"
    return f"{line}\n{render(entries)}"
