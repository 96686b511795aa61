"""Models and generators for the fuzzing properties of ``test_fuzz.py``.

Independent models of what the documents promise (the topic grammar, MQTT
matching, how RFC 6455 ends a frame sequence, the documented codes), the
hypothesis strategies that draw inputs near and far from them, and the settings
that size a run.
"""

from __future__ import annotations

import base64
import json
import os
import re
import string
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from rawws import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
)

# Profiles.

#: Cases per pure property in a long run; 0 (unset) for the suite's short run.
LONG_RUN = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int, *, over_sockets: bool = False) -> settings:
    """The settings of one property: ``examples`` cases in the suite.

    The suite's run is derandomized, so it tries the same cases every time and
    writes no example database. A long run takes its count from
    ``GATEWAY_FUZZ_EXAMPLES`` (a tenth of it over sockets) and a fresh seed;
    a failure prints the blob that replays it.
    """
    if LONG_RUN:
        count = max(1, LONG_RUN // 10) if over_sockets else LONG_RUN
        return settings(
            max_examples=count,
            deadline=None,
            database=None,
            print_blob=True,
            suppress_health_check=list(HealthCheck),
        )
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


# What the documentation promises, read from the documents themselves.

_ROOT = Path(__file__).resolve().parent.parent
_PROTOCOL_DOC = (_ROOT / "docs" / "protocol.md").read_text()
README_TEXT = (_ROOT / "README.md").read_text()


def doc_table(section: str) -> list[str]:
    """The first column of the table under ``## section`` of docs/protocol.md."""
    body = _PROTOCOL_DOC.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    cells = re.findall(r"^\| *`?([^`|]+?)`? *\|", body, re.MULTILINE)
    return [cell for cell in cells if cell not in ("code", "type") and "-" not in cell]


#: Error codes of frames that keep the connection open.
ERROR_CODES = frozenset(doc_table("Errors that keep the connection open"))
#: Close codes the gateway may send of its own accord.
CLOSE_CODES = frozenset(int(code) for code in doc_table("Close codes"))
#: Types of the messages the gateway sends.
SERVER_TYPES = frozenset(doc_table("Server messages"))
#: Error codes of the publish API (README, HTTP API).
PUBLISH_CODES = frozenset({"bad_json", "bad_request", "bad_topic", "too_large"})


# An independent model of the topic grammar (README, HTTP API) and of MQTT
# matching (MQTT 3.1.1, 4.7.1), written from the documents rather than the code.

LEVEL_CHARS = frozenset(string.ascii_letters + string.digits + "_-.:@=")


def model_level(level: str) -> bool:
    """1 to 64 of the allowed characters, and not only dots."""
    return 1 <= len(level) <= 64 and set(level) <= LEVEL_CHARS and set(level) != {"."}


def model_topic(name: object, max_length: int = 10**6, max_depth: int = 10**6) -> bool:
    """Whether the README's grammar accepts ``name`` as a topic."""
    if not isinstance(name, str) or not 0 < len(name) <= max_length:
        return False
    levels = name.split("/")
    return len(levels) <= max_depth and all(map(model_level, levels))


def model_filter(name: object, max_length: int = 10**6, max_depth: int = 10**6) -> bool:
    """Whether the grammar accepts ``name`` as a filter: ``+`` any, ``#`` last."""
    if not isinstance(name, str) or not 0 < len(name) <= max_length:
        return False
    levels = name.split("/")
    if len(levels) > max_depth:
        return False
    return all(
        level == "+"
        or (level == "#" and index == len(levels) - 1)
        or model_level(level)
        for index, level in enumerate(levels)
    )


def model_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching, by translating the filter into a regular expression.

    A filter that breaks the grammar matches nothing.
    """
    if not model_filter(topic_filter):
        return False
    *head, last = topic_filter.split("/")
    parts = ["[^/]+" if level == "+" else re.escape(level) for level in head]
    if last == "#":
        # '#' is the rest of the path, zero levels included: 'a/#' matches 'a'.
        pattern = "/".join(parts) + "(?:/.+)?" if parts else ".+"
    else:
        parts.append("[^/]+" if last == "+" else re.escape(last))
        pattern = "/".join(parts)
    return re.fullmatch(pattern, topic) is not None


# Strategies for names: mostly near the grammar, some far from it.

_ODD_CHARS = "/+# \t\n\x00.é٣ＡK\u200b\ud800"
levels = st.text(alphabet=sorted(LEVEL_CHARS), min_size=1, max_size=66)
names = st.one_of(
    st.lists(levels, min_size=1, max_size=10).map("/".join),
    st.text(alphabet=sorted(LEVEL_CHARS) + list(_ODD_CHARS), max_size=120),
    st.lists(
        st.sampled_from([".", "..", "...", "+", "#", "", "a", "é"]), min_size=1
    ).map("/".join),
    st.text(max_size=80),
)
small_levels = st.sampled_from(["a", "b", "jobs", "x.y", "A-1"])
small_topics = st.lists(small_levels, min_size=1, max_size=5).map("/".join)
small_filters = st.lists(
    st.one_of(small_levels, st.just("+")), min_size=1, max_size=5
).flatmap(
    lambda parts: st.sampled_from(
        ["/".join(parts), "/".join([*parts, "#"]), "/".join([*parts[:-1], "#"])]
    )
)
#: Rights as a token may carry them: valid filters, and a few broken ones.
rights_texts = st.one_of(
    small_filters,
    small_filters,
    st.sampled_from(["#", "jobs/#", "+/#", "#/a", "a/#/b", "a//b", "a+", "jobs/#/x"]),
)


@st.composite
def instances(draw: st.DrawFn, topic_filter: str) -> str:
    """A topic the filter matches, with its wildcards filled in."""
    topic_levels = []
    for level in topic_filter.split("/"):
        if level == "+":
            topic_levels.append(draw(small_levels))
        elif level == "#":
            topic_levels += draw(st.lists(small_levels, max_size=3))
        else:
            topic_levels.append(level)
    if not topic_levels:
        topic_levels = [draw(small_levels)]
    return "/".join(topic_levels)


limits = st.fixed_dictionaries(
    {
        "max_length": st.integers(8, 400),
        "max_depth": st.integers(1, 12),
    }
)


# JSON bodies: trees of any shape, serialized with and without escapes, with the
# values orjson has edges on (big integers, non-finite floats, lone surrogates).

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["\ud800", "\udfff\ud800", "\U0001f600", "\x00", "\u2028"]),
)
json_trees = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)


@st.composite
def json_texts(draw: st.DrawFn, value: st.SearchStrategy[Any] = json_trees) -> str:
    """A value written as JSON text, escaped to ASCII or not."""
    return json.dumps(draw(value), ensure_ascii=draw(st.booleans()))


@st.composite
def cut_texts(draw: st.DrawFn, texts: st.SearchStrategy[str]) -> str:
    """A text cut short somewhere after its first character."""
    text = draw(texts)
    return text[: draw(st.integers(1, max(1, len(text) - 1)))]


def utf8(text: str) -> bytes:
    """Text as UTF-8; lone surrogates are written as bytes UTF-8 forbids."""
    return text.encode("utf-8", "surrogatepass")


def nested(depth: int, kind: str) -> str:
    """A JSON value nested ``depth`` levels deep in arrays or objects."""
    if kind == "[":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


deep_values = st.builds(
    nested, st.integers(200, 1100), st.sampled_from(["[", "{"])
) | st.sampled_from(["1e999", "-1e400", "NaN", "Infinity", "1" * 400, "-0.0", "1e-400"])


# Tokens: garbage, forged headers, and tokens signed with the gateway's secret
# whose claims have any shape.

#: The HS256 secret of the fuzzed gateway.
JWT_SECRET = "fuzz-" + "s3cret" * 8
_NOW = time.time()


def b64url(data: bytes) -> str:
    """Base64url without padding, as in a JWT."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: object, claims: object = None, signature: bytes = b"x") -> str:
    """A token with any header and claims, signed by nobody."""
    return ".".join(
        [b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode())]
        + [b64url(signature)]
    )


def _signed(claims: dict[str, Any]) -> str:
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


#: Expiry times: passed, far ahead, or not a time at all; never within ten
#: minutes of now, so that no connection expires while a case runs.
_expiries = st.one_of(
    st.sampled_from([1, _NOW - 3600, _NOW + 86400, 10**12, 2**63, 1e300]),
    json_leaves.filter(
        lambda value: (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or abs(value - _NOW) > 600
        )
    ),
)
_claims = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.sampled_from(["fuzz-user", "other", ""]) | json_leaves,
        "exp": _expiries,
        "topics": st.lists(rights_texts | names, max_size=3)
        | st.sampled_from(["#", "a/#,b", ""])
        | json_trees,
        "nbf": _expiries,
    },
)
#: Header values for forged tokens, 'alg' of any JSON kind among them.
_forged_headers = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["HS256", "none", "RS256", "ES256", "HS512", ""])
        | st.none()
        | st.integers()
        | json_trees,
        "typ": json_leaves,
        "kid": json_leaves,
        "crit": json_trees,
    },
)
tokens = st.one_of(
    st.builds(_signed, _claims),
    st.builds(forged, _forged_headers, _claims, st.binary(max_size=8)),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=60),
)


# Messages.

op_names = st.sampled_from(["subscribe", "unsubscribe", "ping", "auth", "dance", ""])
topic_lists = st.one_of(
    st.lists(small_filters | names, max_size=5),
    st.lists(small_filters, min_size=99, max_size=102),
    json_trees,
)
operations = st.fixed_dictionaries(
    {},
    optional={
        "op": op_names | json_leaves,
        "topics": topic_lists,
        "offsets": st.dictionaries(
            small_topics | names,
            st.integers(-2, 2**64 + 1) | json_leaves,
            max_size=4,
        )
        | json_trees,
        "ref": st.integers() | st.text(max_size=70) | json_leaves,
        "token": tokens | st.text(max_size=30) | st.just("x" * 8193) | json_leaves,
    },
)
refs = st.integers(-(2**63), 2**64 - 1) | st.text(max_size=64)
#: Operations that keep the protocol's rules, but for what their topics,
#: offsets and tokens may break.


@st.composite
def subscribe_operations(draw: st.DrawFn) -> dict[str, Any]:
    """A subscribe whose offsets, if any, name topics its filters match."""
    filters = draw(st.lists(small_filters, min_size=1, max_size=6))
    message: dict[str, Any] = {"op": "subscribe", "topics": filters}
    if draw(st.booleans()):
        message["ref"] = draw(refs)
    if draw(st.booleans()):
        topics = draw(st.lists(st.sampled_from(filters).flatmap(instances), max_size=3))
        offsets = st.integers(0, 5) | st.integers(0, 2**64 - 1)
        message["offsets"] = {topic: draw(offsets) for topic in topics}
    return message


good_operations = st.one_of(
    subscribe_operations(),
    st.fixed_dictionaries(
        {
            "op": st.just("unsubscribe"),
            "topics": st.lists(small_filters, min_size=1, max_size=6),
        },
        optional={"ref": refs},
    ),
    st.fixed_dictionaries({"op": st.just("ping")}, optional={"ref": refs}),
    st.fixed_dictionaries(
        {"op": st.just("auth"), "token": tokens}, optional={"ref": refs}
    ),
)
messages = st.one_of(
    json_texts(good_operations),
    json_texts(good_operations),
    json_texts(good_operations),
    cut_texts(json_texts(good_operations)),
    json_texts(operations),
    json_texts(),
    deep_values,
    st.text(max_size=60),
    st.binary(max_size=60).map(lambda raw: raw.decode("utf-8", "replace")),
)


def decoded_frame(frame: bytes) -> dict[str, Any]:
    """The JSON object of one server text frame, checked whole and alone."""
    frames = FrameParser().feed(frame)
    assert len(frames) == 1 and frames[0].fin and frames[0].opcode == OP_TEXT
    assert not frames[0].rsv1
    message = frames[0].json()
    assert isinstance(message, dict)
    return message


# Envelopes.

event_types = st.one_of(
    st.from_regex(r"[A-Z][A-Z0-9]{0,5}(_[A-Z0-9]{1,4}){0,3}", fullmatch=True),
    st.text(max_size=10),
    st.just("A" * 65),
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "topic": st.lists(levels, min_size=1, max_size=9).map("/".join) | names,
        "eventSource": st.text(max_size=130) | json_leaves,
        "eventType": event_types | json_leaves,
        "eventDetails": st.dictionaries(st.text(max_size=8), json_trees, max_size=4)
        | json_trees,
        "extra": json_leaves,
    },
)
#: Envelopes that keep every rule, so that encoding gets exercised too.
good_envelopes = st.fixed_dictionaries(
    {
        "topic": st.lists(
            st.text(alphabet=sorted(LEVEL_CHARS), min_size=1, max_size=12),
            min_size=1,
            max_size=4,
        ).map("/".join),
        "eventSource": st.text(
            st.characters(exclude_categories=["Cs", "Cc", "Zl", "Zp"]),
            min_size=1,
            max_size=128,
        ).filter(str.isprintable),
        "eventType": st.from_regex(
            r"[A-Z][A-Z0-9]{0,5}(_[A-Z0-9]{1,4}){0,3}", fullmatch=True
        ),
        "eventDetails": st.dictionaries(st.text(max_size=8), json_trees, max_size=4),
    }
)
bodies = st.one_of(
    st.builds(utf8, json_texts(good_envelopes)),
    st.builds(utf8, json_texts(st.lists(good_envelopes, min_size=1, max_size=6))),
    st.builds(utf8, cut_texts(json_texts(good_envelopes))),
    st.builds(utf8, json_texts(envelopes)),
    st.builds(utf8, json_texts(st.lists(envelopes, max_size=6))),
    st.builds(utf8, json_texts()),
    st.builds(
        lambda value: (
            '{"topic":"a/b","eventSource":"s","eventType":"T","eventDetails":'
            f'{{"v":{value}}}}}'
        ).encode(),
        deep_values,
    ),
    st.binary(max_size=80),
)


def expected_size(draft_topic: str, source: str, kind: str, details: Any) -> int:
    """The encoded size of an event counted as the README says: 20 offset bytes."""
    sample = orjson.dumps(
        {
            "type": "event",
            "topic": draft_topic,
            "offset": 0,
            "id": "0" * 32,
            "publishedAt": "2000-01-01T00:00:00.000000Z",
            "eventSource": source,
            "eventType": kind,
            "eventDetails": details,
        }
    )
    return len(sample) - 1 + 20


fixture_bodies = st.one_of(
    bodies,
    st.builds(
        utf8,
        json_texts(
            st.fixed_dictionaries(
                {},
                optional={
                    "id": st.from_regex(
                        r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,5}", fullmatch=True
                    )
                    | json_leaves,
                    "type": event_types | json_leaves,
                    "minute": st.integers(-1, 201) | json_leaves,
                    "details": json_trees,
                    "fixture": st.fixed_dictionaries(
                        {},
                        optional={
                            "date": st.sampled_from(
                                ["2022-12-18", "2022-02-30", "2022-1-1", "x"]
                            )
                            | json_leaves,
                            "home": st.sampled_from(["ARG", "FRA", "arg", ""]),
                            "away": st.sampled_from(["FRA", "ARG", "A1B"]),
                            "stage": st.text(max_size=3) | json_leaves,
                        },
                    )
                    | json_trees,
                },
            )
        ),
    ),
)


# The WebSocket handler over real sockets.

#: The gateway's default --max-frame-bytes, which the fuzzed gateway keeps.
MAX_FRAME = 65536
_VALID_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
#: Close codes RFC 6455 lets a peer send (websockets refuses the others).
_PEER_CODES = frozenset({*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)})
END_REF = "fuzz-end"


@dataclass(frozen=True, slots=True)
class WireFrame:
    """One client frame, possibly breaking RFC 6455 on purpose.

    Attributes:
        opcode: any four-bit value, not only the defined ones.
        payload: the bytes that follow the header (before masking).
        fin: the FIN bit.
        rsv: the three reserved bits, as a number from 0 to 7.
        masked: clients must mask; False sends the payload in clear.
        declared: a length for the header other than the payload's, always over
            the size limit, so that the gateway refuses at the header.
    """

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    declared: int | None = None

    @property
    def length(self) -> int:
        return len(self.payload) if self.declared is None else self.declared

    def encode(self) -> bytes:
        """The frame's bytes on the wire."""
        first = (0x80 if self.fin else 0) | self.rsv << 4 | self.opcode
        mask_bit = 0x80 if self.masked else 0
        length = self.length
        if length < 126:
            header = struct.pack("!BB", first, mask_bit | length)
        elif length < 65536:
            header = struct.pack("!BBH", first, mask_bit | 126, length)
        else:
            header = struct.pack("!BBQ", first, mask_bit | 127, length)
        if not self.masked:
            return header + self.payload
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(self.payload))
        return header + mask + masked


@dataclass(frozen=True, slots=True)
class Expected:
    """What the gateway must do with a frame sequence, by RFC 6455 and the docs.

    Attributes:
        close_codes: the codes its close frame may carry; empty when the
            connection must stay open. None stands for a close without a code.
        messages: data messages complete before anything ends the connection;
            each gets one answer while it stays open.
        echo: whether the client's own close frame may end the connection.
    """

    close_codes: frozenset[int | None]
    messages: int
    echo: bool


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def expected_outcome(frames: list[WireFrame]) -> Expected:
    """Predict how a gateway that keeps RFC 6455 ends a frame sequence.

    The Sans-I/O core parses every frame it receives and stops at the first that
    breaks the protocol: 1002 for framing, 1009 over the size limit, 1007 for a
    close reason that is not UTF-8. A client's valid close frame is echoed. The
    gateway itself closes with 1007 on a text message that is not UTF-8, unless
    the core ended the connection first, which depends on how TCP delivers the
    bytes: both codes are then allowed.
    """
    fragment_size: int | None = None
    parts: list[bytes] = []
    is_text = False
    messages = 0
    bad_text = False

    def ended(code: int | None, *, echo: bool = False) -> Expected:
        codes = {code} | ({1007} if bad_text else set())
        return Expected(frozenset(codes), messages, echo)

    for frame in frames:
        if frame.opcode not in _VALID_OPCODES or not frame.masked:
            return ended(1002)
        if frame.length > MAX_FRAME - (fragment_size or 0):
            return ended(1009)
        control = frame.opcode >= OP_CLOSE
        if frame.rsv or (control and (frame.length > 125 or not frame.fin)):
            return ended(1002)
        complete = False
        if frame.opcode in (OP_TEXT, OP_BINARY):
            if fragment_size is not None:
                return ended(1002)
            parts, is_text = [frame.payload], frame.opcode == OP_TEXT
            complete = frame.fin
            fragment_size = None if frame.fin else len(frame.payload)
        elif frame.opcode == OP_CONT:
            if fragment_size is None:
                return ended(1002)
            parts.append(frame.payload)
            complete = frame.fin
            fragment_size = None if frame.fin else fragment_size + len(frame.payload)
        elif frame.opcode == OP_CLOSE:
            payload = frame.payload
            if len(payload) == 1:
                return ended(1002)
            if len(payload) >= 2 and not _is_utf8(payload[2:]):
                return ended(1007)
            code = struct.unpack("!H", payload[:2])[0] if payload else None
            if code is not None and code not in _PEER_CODES:
                return ended(1002)
            if fragment_size is not None:
                return ended(1002)
            return ended(code, echo=True)
        if complete:
            messages += 1
            if is_text and not _is_utf8(b"".join(parts)):
                bad_text = True
    return Expected(frozenset({1007} if bad_text else set()), messages, False)


def _fragments(
    opcode: int, payload: bytes, cuts: list[int], ping: bool
) -> list[WireFrame]:
    """A message cut at ``cuts``, with a ping between fragments if asked."""
    bounds = [0, *sorted(c % (len(payload) + 1) for c in cuts), len(payload)]
    frames = []
    for index, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        last = index == len(bounds) - 2
        frames.append(WireFrame(OP_CONT if index else opcode, payload[start:end], last))
        if ping and not last:
            frames.append(WireFrame(OP_PING, b"p"))
    return frames


text_payloads = st.one_of(
    st.builds(utf8, json_texts(good_operations)),
    st.builds(utf8, json_texts(good_operations)),
    st.builds(utf8, messages),
    st.binary(max_size=40),
    st.sampled_from(
        [b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b'{"op":"\xff"}']
    ),
)
messages_on_wire = st.builds(
    _fragments,
    st.sampled_from([OP_TEXT, OP_TEXT, OP_TEXT, OP_BINARY]),
    text_payloads,
    st.lists(st.integers(0, 200), max_size=3),
    st.booleans(),
)
close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),
    st.builds(
        lambda code, reason: struct.pack("!H", code) + reason,
        st.sampled_from([0, 999, 1000, 1001, 1004, 1005, 1006, 1011, 1015, 2999, 5000])
        | st.integers(0, 65535),
        st.text(max_size=20).map(lambda text: utf8(text)[:123]) | st.binary(max_size=8),
    ),
)
odd_frames = st.one_of(
    st.builds(WireFrame, st.just(OP_CLOSE), close_payloads),
    st.builds(WireFrame, st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=130)),
    st.builds(WireFrame, st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15])),
    st.builds(
        WireFrame, st.just(OP_TEXT), st.just(b'{"op":"ping"}'), rsv=st.integers(1, 7)
    ),
    st.builds(
        WireFrame, st.just(OP_TEXT), st.just(b'{"op":"ping"}'), masked=st.just(False)
    ),
    st.builds(WireFrame, st.just(OP_CONT), st.binary(max_size=8), st.booleans()),
    st.builds(WireFrame, st.just(OP_PING), st.binary(max_size=8), fin=st.just(False)),
    st.builds(
        WireFrame,
        st.sampled_from([OP_TEXT, OP_BINARY, OP_CONT, OP_PING]),
        st.binary(max_size=16),
        declared=st.integers(MAX_FRAME + 1, 2**64 - 1),
    ),
    st.builds(
        lambda size, fin: WireFrame(
            OP_TEXT, b'{"op":"ping"' + b" " * (size - 13) + b"}", fin
        ),
        st.sampled_from([MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1]),
        st.booleans(),
    ),
)
#: One step of a sequence that keeps RFC 6455: a message or a ping or pong.
steps = st.one_of(
    messages_on_wire,
    messages_on_wire,
    st.builds(
        WireFrame, st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125)
    ).map(lambda frame: [frame]),
)


@st.composite
def frame_sequences(draw: st.DrawFn) -> tuple[list[WireFrame], list[bool]]:
    """Frames ending with a ping operation, and where TCP writes split them."""
    frames = [frame for step in draw(st.lists(steps, max_size=8)) for frame in step]
    # Half the sequences also hold one odd frame, anywhere, even inside a
    # fragmented message: what comes before it must still be answered.
    if draw(st.booleans()):
        frames.insert(draw(st.integers(0, len(frames))), draw(odd_frames))
    end = orjson.dumps({"op": "ping", "ref": END_REF})
    frames.append(WireFrame(OP_TEXT, end))
    splits = draw(st.lists(st.booleans(), min_size=len(frames), max_size=len(frames)))
    return frames, splits


class LogWatch:
    """Reads a gateway's log from where it last stopped, a line at a time."""

    # uvicorn warns of HTTP it does not serve (an h2c upgrade, bytes that are not
    # HTTP) before the gateway sees the request: its policy, not a gateway fault.
    _BAD = re.compile(
        r"^(\S+ \S+ (ERROR|CRITICAL)\b|\S+ \S+ WARNING (?!uvicorn\.error: "
        r"(Unsupported upgrade request|Invalid HTTP request received)\.$)|"
        r"Traceback \(most recent call last\)|--- Logging error ---)",
        re.MULTILINE,
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        self.position = 0

    def new_lines(self) -> str:
        """The complete lines written since the last call."""
        with open(self.path, "rb") as log:
            log.seek(self.position)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.position += len(complete)
        return complete.decode(errors="replace")

    def assert_clean(self) -> None:
        """Fail on a warning, an error or a traceback logged since the last call."""
        lines = self.new_lines()
        found = self._BAD.search(lines)
        assert found is None, lines[max(0, found.start() - 2000) : found.start() + 4000]


# Upgrade requests.

_HEADER_VALUE = st.text(alphabet=string.printable[:95], max_size=30).map(str.strip)
UPGRADE_KEY = base64.b64encode(b"0123456789abcdef").decode()


def _header_values(port: int) -> dict[str, st.SearchStrategy[str]]:
    """Values to try per header: right ones, near misses and any text."""
    return {
        "Upgrade": st.sampled_from(["websocket", "WebSocket", "h2c"]) | _HEADER_VALUE,
        "Connection": st.sampled_from(["Upgrade", "keep-alive, Upgrade", "close"]),
        "Sec-WebSocket-Key": st.sampled_from([UPGRADE_KEY, "short", ""])
        | _HEADER_VALUE,
        "Sec-WebSocket-Version": st.sampled_from(["13", "8", "13, 8"]) | _HEADER_VALUE,
        "Origin": st.sampled_from(
            [f"http://127.0.0.1:{port}", "https://app.example/", "null", "http://evil"]
        )
        | _HEADER_VALUE,
        "Authorization": st.sampled_from(["Bearer", "Bearer x.y.z", "Basic eA=="])
        | tokens.map("Bearer {}".format)
        | _HEADER_VALUE,
        "Sec-WebSocket-Extensions": st.sampled_from(
            ["permessage-deflate; client_max_window_bits", 'x; y="z']
        )
        | _HEADER_VALUE,
        "Sec-WebSocket-Protocol": _HEADER_VALUE,
        "X-Fuzz": _HEADER_VALUE,
    }


@st.composite
def upgrade_requests(draw: st.DrawFn, port: int) -> bytes:
    """A correct upgrade request to /ws, then up to four mutations of it.

    A mutation drops a header, repeats one (a multidict must cope), gives one
    another value, or adds an optional one; the path may change or carry a
    token in its query.
    """
    values = _header_values(port)
    path = draw(st.sampled_from(["/ws", "/ws", "/ws", "/ws/", "/nope", "/ws?x=1"]))
    if draw(st.sampled_from([False, False, False, True])):
        separator = "&" if "?" in path else "?"
        path += f"{separator}access_token=" + draw(tokens)
    headers = [
        ("Host", f"127.0.0.1:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", UPGRADE_KEY),
        ("Sec-WebSocket-Version", "13"),
    ]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        mutation = draw(st.sampled_from(["drop", "repeat", "change", "add", "add"]))
        # The Host header, first, is never dropped or changed.
        index = draw(st.integers(1, len(headers) - 1)) if len(headers) > 1 else 0
        if mutation == "drop" and index:
            del headers[index]
        elif mutation == "repeat":
            headers.append(headers[index])
        elif mutation == "change" and index:
            name = headers[index][0]
            headers[index] = (name, draw(values.get(name, _HEADER_VALUE)))
        else:
            name = draw(st.sampled_from(sorted(values)))
            headers.append((name, draw(values[name])))
    if draw(st.booleans()):
        headers = [headers[0], *draw(st.permutations(headers[1:]))]
    lines = [f"GET {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
