"""Logging: credentials never reach a log line."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog

from streamrec import logging as logs

TOKEN = "f" * 32  # a Twilio auth token's shape


@pytest.fixture
def restored() -> Iterator[None]:
    """structlog's configuration and the root logger's handlers are put back after the test."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers, root.level = handlers, level
        structlog.configure(**saved)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://default:s3cr%40t@cache:6380", "rediss://default:***@cache:6380"),
        ("postgresql://rec:pw/with/slashes@db/rec", "postgresql://rec:***@db/rec"),
        ("dsn postgres://rec:pw@db:5432/rec failed", "dsn postgres://rec:***@db:5432/rec failed"),
        (f"token {TOKEN} refused", "token *** refused"),
        ("redis://cache:6379/0 and postgresql://rec@db/rec", None),
        ("http://hooks.example.com:8080/twilio/recording", None),
        ("short x secret", None),
    ],
)
def test_redact(text: str, redacted: str | None) -> None:
    """URL passwords and configured secrets become ***; the rest of the text is left as is."""
    assert logs.redact(text, [TOKEN, "x"]) == (redacted or text)


def test_every_structlog_line_is_redacted(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event's values, nested ones and its traceback included, carry no URL password or token."""
    logs.configure(fmt="json", secrets=[TOKEN])
    log = structlog.get_logger("test_logging")
    try:
        raise ConnectionError(f"cannot reach redis://:secret@cache:6379 with {TOKEN}")
    except ConnectionError:
        log.exception(
            "something_failed",
            redis="redis://:secret@cache:6379/0",
            database={"url": "postgresql://rec:pgsecret@db/rec"},
            attempts=3,
        )
    line = json.loads(capsys.readouterr().err)
    assert line["redis"] == "redis://:***@cache:6379/0"
    assert line["database"] == {"url": "postgresql://rec:***@db/rec"}
    assert line["attempts"] == 3
    text = json.dumps(line)
    for secret in ("secret@", "pgsecret", TOKEN):
        assert secret not in text, secret
    assert "redis://:***@cache:6379 with ***" in line["exception"]


def test_stdlib_lines_are_redacted(restored: None) -> None:
    """A line of another library (asyncio, aiohttp) through the standard library is redacted."""
    logs.configure(fmt="json", secrets=[TOKEN])
    [handler] = [
        h for h in logging.getLogger().handlers if isinstance(h.formatter, logs.RedactingFormatter)
    ]
    record = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error with %s", ("redis://:pw@h",), None
    )
    try:
        raise OSError(f"token {TOKEN}")
    except OSError:
        record.exc_info = sys.exc_info()
    text = handler.format(record)
    assert text.startswith("Error with redis://:***@h")
    assert TOKEN not in text
    assert "OSError: token ***" in text
