"""structlog, configured once: JSON lines in production, console output in a terminal.

Every line, structlog's and the standard library's, is redacted on its way out:
the password of any URL (``redis://:***@host``, ``postgresql://user:***@db``)
and each configured secret (the Twilio auth token, the OpenAI key).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

# scheme://user:password@ (user may be empty): the password is what goes.
URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:@/]*:)[^\s@]+@")
MASK = "***"
MIN_SECRET_CHARS = 8
"""Shorter "secrets" (a placeholder such as ``x``) are not masked: masking them would
garble every line containing that string, and tell which string it was."""


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every URL password and each of ``secrets`` replaced by ***."""
    text = URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    for secret in secrets:
        if len(secret) >= MIN_SECRET_CHARS:
            text = text.replace(secret, MASK)
    return text


class Redactor:
    """A structlog processor that redacts every value of an event (see ``redact``).

    A value that is not a string is rendered by the renderer as it was, unless
    its text needed redacting: then the redacted text replaces it.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = tuple(secrets)

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """The event with each value redacted."""
        return {key: self._value(value) for key, value in event.items()}

    def _value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: self._value(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._value(item) for item in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        text = str(value)
        clean = redact(text, self._secrets)
        return value if clean == text else clean


class RedactingFormatter(logging.Formatter):
    """A stdlib formatter whose lines, tracebacks included, are redacted."""

    def __init__(self, fmt: str, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self._secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        """The record as text, redacted."""
        return redact(super().format(record), self._secrets)


def configure(*, fmt: str = "auto", level: str = "info", secrets: Iterable[str] = ()) -> None:
    """Set up structlog and stdlib logging. ``fmt`` is auto, json or console.

    ``secrets`` are masked wherever they appear in a line, as URL passwords are.
    """
    secrets = tuple(secrets)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            Redactor(secrets),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(message)s", secrets))
    # force: this is the process's one logging setup, replacing any handler already there.
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler], force=True)
