"""Unit tests of the pure logic: topic grammar, envelope, frames, router, messages."""

from __future__ import annotations

import struct

import orjson
import pytest

from gateway.errors import BadRequest, BadTopic, LimitExceeded, TooLarge
from gateway.events.envelope import Draft, parse_drafts, stamp
from gateway.events.frames import text_frame
from gateway.events.topics import filter_matches, validate_filter, validate_topic
from gateway.fanout.router import Router
from gateway.transports.messages import Subscribe, parse_operation

LIMITS = {"max_topic_length": 256, "max_topic_depth": 8}


@pytest.mark.parametrize(
    "name",
    ["stocks/AAPL", "fixtures/2022-12-18/ARG-FRA", "teams/ARG", "jobs/3f2a9c", "a"],
)
def test_valid_topics_are_accepted(name: str) -> None:
    """Topic names from the design are valid as names and as filters."""
    assert validate_topic(name) == name
    assert validate_filter(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/stocks",
        "stocks/",
        "a//b",
        "stocks/+",
        "stocks/#",
        "a b",
        "a\x00b",
        "..",
        "a/../b",
        "x" * 300,
        "/".join("a" * 9),
        "$SYS/x",
        42,
        None,
    ],
)
def test_bad_topics_are_refused(name: object) -> None:
    """Empty levels, wildcards, NUL, spaces, dots, overlong or deep names fail."""
    with pytest.raises(BadTopic):
        validate_topic(name)


@pytest.mark.parametrize("name", ["a/#/b", "a+/b", "#/a", "a//#", "a/b#"])
def test_bad_filters_are_refused(name: str) -> None:
    """'#' only as the last level, '+' only as a whole level."""
    with pytest.raises(BadTopic):
        validate_filter(name)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("stocks/+", "stocks/AAPL", True),
        ("stocks/+", "stocks/AAPL/x", False),
        ("stocks/#", "stocks/AAPL/x", True),
        ("stocks/#", "stocks", True),
        ("#", "teams/ARG", True),
        ("+/ARG", "teams/ARG", True),
        ("+", "teams/ARG", False),
        ("stocks/AAPL", "stocks/AAPL", True),
        ("stocks/AAPL", "stocks/MSFT", False),
    ],
)
def test_filter_matching(topic_filter: str, topic: str, expected: bool) -> None:
    """Filters match as in MQTT."""
    assert filter_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_text_frame_lengths(size: int) -> None:
    """Each length encoding (7, 16 and 64 bits) gives a well-formed frame."""
    frame = text_frame(b"x" * size)
    assert frame[0] == 0x81
    if size < 126:
        assert frame[1] == size and len(frame) == size + 2
    elif size < 65536:
        assert frame[1] == 126 and struct.unpack("!H", frame[2:4])[0] == size
    else:
        assert frame[1] == 127 and struct.unpack("!Q", frame[2:10])[0] == size


def _item(**changes: object) -> dict[str, object]:
    item: dict[str, object] = {
        "topic": "stocks/AAPL",
        "eventSource": "feed",
        "eventType": "PRICE_CHANGED",
        "eventDetails": {"price": 1.5},
    }
    item.update(changes)
    return item


def test_stamped_event_is_encoded_once_with_its_frame() -> None:
    """The payload carries envelope and stamps; the frame wraps the same bytes."""
    (draft,) = parse_drafts(orjson.dumps(_item()), max_batch=10, **LIMITS)
    event = stamp(draft, 7)
    body = orjson.loads(event.payload)
    assert body["offset"] == 7 and body["topic"] == "stocks/AAPL"
    assert body["eventDetails"] == {"price": 1.5} and body["type"] == "event"
    assert event.frame.endswith(event.payload)


@pytest.mark.parametrize(
    ("body", "error", "fragment"),
    [
        (b"{", BadRequest, "not valid JSON"),
        (b"[]", BadRequest, "empty array"),
        (b"3", BadRequest, "object or an array"),
        (orjson.dumps(_item(extra=1)), BadRequest, "unknown field 'extra'"),
        (orjson.dumps({"topic": "a"}), BadRequest, "missing field 'eventSource'"),
        (orjson.dumps(_item(eventType="priceChanged")), BadRequest, "eventType"),
        (orjson.dumps(_item(eventDetails=[1])), BadRequest, "eventDetails"),
        (orjson.dumps(_item(eventSource="")), BadRequest, "eventSource"),
        (orjson.dumps(_item(topic="a/+")), BadTopic, "event.topic"),
        (orjson.dumps([_item()] * 11), TooLarge, "more than 10"),
    ],
)
def test_bad_publish_bodies(body: bytes, error: type[Exception], fragment: str) -> None:
    """Each malformed body fails with an error that names the problem."""
    with pytest.raises(error, match=fragment):
        parse_drafts(body, max_batch=10, **LIMITS)


def test_oversized_event_is_refused() -> None:
    """An event over max_bytes once encoded raises TooLarge."""
    draft = Draft("a", "s", "X_HAPPENED", {"blob": "x" * 1000})
    with pytest.raises(TooLarge, match="over the limit of 500"):
        stamp(draft, 1, max_bytes=500)


class _Sink:
    def __init__(self) -> None:
        self.offsets: list[int] = []

    def deliver(self, event: object) -> None:
        self.offsets.append(event.offset)  # type: ignore[attr-defined]


def test_router_delivers_once_per_subscriber_across_overlapping_filters() -> None:
    """A subscriber holding several matching filters gets each event once."""
    router = Router()
    sink, other = _Sink(), _Sink()
    for topic_filter in ("stocks/+", "stocks/AAPL", "#"):
        router.add(sink, topic_filter)
    router.add(other, "teams/#")
    event = stamp(Draft("stocks/AAPL", "s", "X_HAPPENED", {}), 1)
    assert router.deliver(event) == 1
    assert sink.offsets == [1] and other.offsets == []
    assert router.remove(sink, "#") is True
    assert router.remove(sink, "nothing") is False
    assert router.remove_all(sink, ["stocks/+", "stocks/AAPL"]) == [
        "stocks/+",
        "stocks/AAPL",
    ]
    assert router.deliver(event) == 0
    assert router.subscription_count == 1


def test_subscribe_operation_parsing() -> None:
    """A subscribe with offsets and ref parses; repeats are dropped."""
    operation = parse_operation(
        '{"op":"subscribe","topics":["a/+","a/+"],"offsets":{"a/b":3},"ref":"r"}',
        max_subscriptions=5,
        **LIMITS,
    )
    assert operation == Subscribe(("a/+",), {"a/b": 3}, "r")


@pytest.mark.parametrize(
    ("text", "error", "code"),
    [
        ("{", BadRequest, "bad_json"),
        ("[]", BadRequest, "bad_message"),
        ('{"op":"dance"}', BadRequest, "unknown_op"),
        ('{"op":"subscribe","topics":"a"}', BadRequest, "bad_field"),
        ('{"op":"subscribe","topics":["a/#/b"]}', BadTopic, "bad_topic"),
        ('{"op":"subscribe","topics":["a","b","c"]}', LimitExceeded, "limit_exceeded"),
        ('{"op":"subscribe","topics":["a"],"offsets":{"b":1}}', BadTopic, "bad_topic"),
        (
            '{"op":"subscribe","topics":["a"],"offsets":{"a":-1}}',
            BadRequest,
            "bad_field",
        ),
        ('{"op":"ping","ref":[1]}', BadRequest, "bad_field"),
    ],
)
def test_bad_operations(text: str, error: type[Exception], code: str) -> None:
    """Each bad client message maps to its documented error code."""
    with pytest.raises(error) as caught:
        parse_operation(text, max_subscriptions=2, **LIMITS)
    assert caught.value.code == code  # type: ignore[attr-defined]


def test_readme_lists_every_setting() -> None:
    """The README's settings table names each flag with its variable."""
    from pathlib import Path

    from gateway.config import Settings, flag_name

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{flag_name(name)}` | `GATEWAY_{name.upper()}` |" in readme, name


@pytest.mark.parametrize(
    ("topic_filter", "pattern"),
    [("stocks/+", "stocks/*"), ("#", "*"), ("a/#", "a*"), ("+/x/+", "*/x/*")],
)
def test_redis_glob_covers_the_filter(topic_filter: str, pattern: str) -> None:
    """A wildcard filter's Redis pattern lets through at least what it matches."""
    import fnmatch

    from gateway.state.redis import _glob

    assert _glob(topic_filter) == pattern
    for topic in ("stocks/AAPL", "a", "a/b/c", "q/x/z"):
        if filter_matches(topic_filter, topic):
            assert fnmatch.fnmatchcase(topic, pattern), topic


@pytest.mark.parametrize(
    ("given", "flag", "words"),
    [
        ({"anonymous_read": "stocks/#,a/b+"}, "--anonymous-read", "'b+'"),
        ({"allowed_origins": "https://ok.example,evil"}, "--allowed-origins", "'evil'"),
        ({"allowed_origins": "https://a.example/path"}, "--allowed-origins", "path"),
        ({"max_frame_bytes": 10}, "--max-frame-bytes", "1024"),
        ({"jwt_secret": "short"}, "--jwt-secret", "32"),
    ],
)
def test_invalid_settings_name_their_flag_and_variable(
    given: dict[str, object], flag: str, words: str
) -> None:
    """A bad value is refused at start with a message naming flag and variable."""
    from gateway.config import SettingsError, load_settings

    with pytest.raises(SettingsError) as refused:
        load_settings(**given)
    message = str(refused.value)
    variable = "GATEWAY_" + flag[2:].replace("-", "_").upper()
    assert f"{flag} / {variable}" in message and words in message, message


def test_origins_and_filters_that_are_valid_are_taken() -> None:
    """Lists of valid origins (a trailing slash tolerated, * for any) and filters."""
    from gateway.config import load_settings

    settings = load_settings(
        allowed_origins="https://fans.example, http://localhost:3000/, *",
        anonymous_read="stocks/#, teams/+ ,",
    )
    assert settings.anonymous_read == "stocks/#, teams/+ ,"
