"""Phone numbers and the businesses they belong to (the ``numbers`` table).

A callback's URL names its business; a recording found through Twilio's REST
API does not. A multi-tenant phone product knows its tenants by their numbers,
so the reconciler maps a recording's call to a business by number: the number
called (``to``) for an inbound call, the number calling (``from``) for an
outbound one. Numbers are E.164 (``+15551234567``), as Twilio writes them.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import asyncpg

from streamrec import schema
from streamrec.events import BUSINESS_ID_RULE, is_business_id
from streamrec.settings import Settings

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


class InvalidNumber(ValueError):
    """A phone number or business id that the numbers table does not take."""


def _checked(number: str, business_id: str | None = None) -> str:
    if not E164.fullmatch(number):
        raise InvalidNumber(f"{number!r} is not an E.164 number such as +15551234567")
    if business_id is not None and not is_business_id(business_id):
        raise InvalidNumber(f"business id {business_id!r} is not {BUSINESS_ID_RULE}")
    return number


async def add(pool: Any, number: str, business_id: str) -> None:
    """Map ``number`` to ``business_id`` (replacing its earlier business); InvalidNumber if bad."""
    await pool.execute(
        "INSERT INTO numbers (phone_number, business_id) VALUES ($1, $2)"
        " ON CONFLICT (phone_number) DO UPDATE SET business_id = EXCLUDED.business_id",
        _checked(number, business_id),
        business_id,
    )


async def remove(pool: Any, number: str) -> bool:
    """Forget ``number``; False if it was not mapped. InvalidNumber if it is not E.164."""
    status = await pool.execute("DELETE FROM numbers WHERE phone_number = $1", _checked(number))
    return str(status) != "DELETE 0"


async def mapping(pool: Any) -> dict[str, str]:
    """Every number and its business, in one query (read once per reconcile run)."""
    rows = await pool.fetch("SELECT phone_number, business_id FROM numbers ORDER BY phone_number")
    return {r["phone_number"]: r["business_id"] for r in rows}


def business_of(
    mapped: dict[str, str], *, to: str | None, from_: str | None, direction: str | None
) -> str | None:
    """The business of a call: its ``to`` for inbound calls, its ``from`` for outbound ones.

    Twilio's directions are ``inbound``, ``outbound-api`` and ``outbound-dial``.
    None when the number is not mapped (or the call's direction is unknown).
    """
    if direction == "inbound":
        return mapped.get(to or "")
    if (direction or "").startswith("outbound"):
        return mapped.get(from_ or "")
    return None


async def command(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``numbers add|list|remove``: 0 done; 1 the number was not mapped; 2 a bad number."""
    await schema.migrate(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        if args.action == "add":
            await add(conn, args.number, args.business_id)
            print(f"{args.number} -> {args.business_id}")
        elif args.action == "remove":
            if not await remove(conn, args.number):
                print(f"streamrec: {args.number} is not mapped", file=sys.stderr)
                return 1
            print(f"{args.number} removed")
        else:
            for number, business in (await mapping(conn)).items():
                print(f"{number:<16} {business}")
    except InvalidNumber as exc:
        print(f"streamrec: {exc}", file=sys.stderr)
        return 2
    finally:
        await conn.close()
    return 0
