"""The webhook's own HMAC-SHA1 signature against twilio's RequestValidator, on a corpus.

The webhook computes Twilio's signature itself on its fast path; RequestValidator's
behaviour is the contract. A seeded generator makes forms with repeated names,
repeated and empty values, unicode in names and values, and URLs with ports,
paths and query strings; every one must sign exactly as the validator signs it.
"""

from __future__ import annotations

import random

import pytest
from multidict import MultiDict, MultiDictProxy
from twilio.request_validator import RequestValidator

from streamrec.producer import sha1_signature

NAMES = ["AccountSid", "CallSid", "RecordingSid", "Digits", "a", "A", "a b", "ä", "名前", "", "x=y"]
VALUES = ["", "0", "1", "completed", "a&b", "ö", "🙂", " ", "x y", "100%", "RE" + "0" * 32]
URLS = [
    "https://example.com/twilio/recording",
    "https://example.com:443/twilio/recording?business_id=b1",
    "http://127.0.0.1:8080/twilio/recording?business_id=b-2&x=1",
    "https://example.com/twilio/recording?business_id=%C3%A4&flag",
    "https://ëxample.com/p?q=名前",
]


def _form(rng: random.Random) -> MultiDictProxy[str]:
    pairs = [(rng.choice(NAMES), rng.choice(VALUES)) for _ in range(rng.randrange(0, 12))]
    return MultiDictProxy(MultiDict(pairs))


@pytest.mark.parametrize("seed", range(5))
def test_the_signature_is_the_validators_on_a_generated_corpus(seed: int) -> None:
    """400 forms per seed: the same signature as RequestValidator.compute_signature."""
    rng = random.Random(seed)
    for _ in range(400):
        token = rng.choice(["secret", "tøken", "x" * 32])
        url = rng.choice(URLS)
        form = _form(rng)
        expected = RequestValidator(token).compute_signature(url, form)
        assert sha1_signature(token.encode(), url, form) == expected, (url, list(form.items()))


def test_a_changed_value_or_name_changes_the_signature() -> None:
    """The signature covers names, values and the URL: changing any one changes it."""
    form = MultiDictProxy(MultiDict([("a", "1"), ("b", "2")]))
    base = sha1_signature(b"t", "https://h/p", form)
    assert (
        sha1_signature(b"t", "https://h/p", MultiDictProxy(MultiDict([("a", "1"), ("b", "3")])))
        != base
    )
    assert (
        sha1_signature(b"t", "https://h/p", MultiDictProxy(MultiDict([("a", "1"), ("c", "2")])))
        != base
    )
    assert sha1_signature(b"t", "https://h/q", form) != base
    assert sha1_signature(b"u", "https://h/p", form) != base
