"""Property-based fuzzing: topic grammar, read rights, envelope, protocol, sockets.

Each property states what must hold for any input, checked with hypothesis over
generated cases (models and generators are in ``fuzzing.py``). The pure ones run
in-process; the others send generated frame sequences, resumes and upgrade
requests to a real gateway over real sockets, one gateway per backend for the
whole module, while a well-behaved subscriber keeps receiving.

The suite runs a few cases per property with a fixed seed. A long run draws fresh
cases: ``GATEWAY_FUZZ_EXAMPLES=N`` makes each pure property try ``N`` cases and each
socket property a tenth of them, with the per-test timeout raised to an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import jwt
import orjson
import pytest
from conftest import backend_environment
from fuzzing import (
    CLOSE_CODES,
    END_REF,
    ERROR_CODES,
    JWT_SECRET,
    LONG_RUN,
    PUBLISH_CODES,
    README_TEXT,
    SERVER_TYPES,
    UPGRADE_KEY,
    Expected,
    LogWatch,
    WireFrame,
    bodies,
    decoded_frame,
    expected_outcome,
    expected_size,
    fixture_bodies,
    forged,
    frame_sequences,
    fuzz,
    instances,
    limits,
    messages,
    model_filter,
    model_matches,
    model_topic,
    names,
    rights_texts,
    small_filters,
    small_topics,
    upgrade_requests,
)
from hypothesis import event as note
from hypothesis import given
from hypothesis import strategies as st
from rawws import (
    OP_CLOSE,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameParser,
    RawWebSocket,
    open_socket,
    parse_response,
)
from support import API_KEY, Gateway, event, free_port, start_gateway, timeout
from websockets.frames import Frame as CoreFrame
from websockets.frames import Opcode
from websockets.sync.client import ClientConnection, connect

from gateway.errors import BadRequest, BadTopic, ClientError, TooLarge, Unauthorized
from gateway.events.envelope import decode_event, encode, parse_drafts
from gateway.events.frames import text_frame
from gateway.events.topics import filter_matches, validate_filter, validate_topic
from gateway.ingress.webhooks import parse_fixture_event
from gateway.security.permissions import ReadRights, filter_covers, is_job_topic
from gateway.security.tokens import TokenVerifier
from gateway.transports.messages import (
    Authenticate,
    Ping,
    Subscribe,
    Unsubscribe,
    control_frame,
    error_frame,
    parse_operation,
    request_ref,
)
from gateway.transports.websocket import _core_logger

pytestmark = pytest.mark.timeout(3600 if LONG_RUN else 60)


def test_documented_codes_were_read() -> None:
    """The tables the properties check against were found in the documents."""
    assert {"bad_json", "bad_topic", "binary_frame", "offset_ahead"} <= ERROR_CODES
    assert {1000, 1002, 1007, 1009, 1011, 4001} <= CLOSE_CODES
    assert {"welcome", "event", "error", "pong"} <= SERVER_TYPES
    assert all(f"`{code}`" in README_TEXT for code in PUBLISH_CODES)


# Topics.


@fuzz(600)
@given(name=names | st.integers() | st.none() | st.lists(st.text()), limit=limits)
def test_any_topic_is_accepted_as_the_grammar_says_or_refused_with_bad_topic(
    name: object, limit: dict[str, int]
) -> None:
    """validate_topic accepts exactly the README's grammar, else raises BadTopic."""
    try:
        accepted = validate_topic(name, **limit)
    except BadTopic:
        note("refused")
        assert not model_topic(name, **limit), name
    else:
        note("accepted")
        assert accepted == name
        assert model_topic(name, **limit), name


@fuzz(600)
@given(name=names | small_filters | st.integers() | st.none(), limit=limits)
def test_any_filter_is_accepted_as_the_grammar_says_or_refused_with_bad_topic(
    name: object, limit: dict[str, int]
) -> None:
    """validate_filter accepts exactly the grammar with wildcards, else BadTopic."""
    try:
        accepted = validate_filter(name, **limit)
    except BadTopic:
        note("refused")
        assert not model_filter(name, **limit), name
    else:
        note("accepted")
        assert accepted == name
        assert model_filter(name, **limit), name


@fuzz(600)
@given(data=st.data(), topic_filter=small_filters, other=small_topics)
def test_filter_matches_as_mqtt_says(
    data: st.DataObject, topic_filter: str, other: str
) -> None:
    """filter_matches agrees with the MQTT reference on matching and other topics."""
    matching = data.draw(instances(topic_filter))
    assert filter_matches(topic_filter, matching)
    assert model_matches(topic_filter, matching)
    assert filter_matches(topic_filter, other) == model_matches(topic_filter, other)


@fuzz(600)
@given(data=st.data(), right=rights_texts, topic_filter=small_filters)
def test_a_covering_right_matches_every_topic_of_the_filter(
    data: st.DataObject, right: str, topic_filter: str
) -> None:
    """filter_covers(right, f) means every topic f matches is matched by right."""
    covered = filter_covers(right, topic_filter)
    note("covered" if covered else "not covered")
    if covered:
        for _ in range(5):
            topic = data.draw(instances(topic_filter))
            assert model_matches(right, topic), (right, topic_filter, topic)
    if "+" not in topic_filter and "#" not in topic_filter:
        # A plain topic is covered exactly when the right matches it.
        assert covered == model_matches(right, topic_filter)


@fuzz(600)
@given(
    data=st.data(),
    rights=st.lists(rights_texts, max_size=4),
    topic_filter=small_filters | st.sampled_from(["jobs/a", "jobs/+", "+", "#"]),
)
def test_read_rights_never_grant_more_than_their_filters(
    data: st.DataObject, rights: list[str], topic_filter: str
) -> None:
    """ReadRights.allows grants only topics some right matches, jobs by a jobs right."""
    read = ReadRights.parse(rights)
    note("allowed" if read.allows(topic_filter) else "refused")
    if not read.allows(topic_filter) or is_job_topic(topic_filter):
        # A full job topic is the documented exception: its id is its key.
        return
    for _ in range(5):
        topic = data.draw(instances(topic_filter))
        assert any(model_matches(right, topic) for right in read.filters), topic
        if topic.split("/")[0] == "jobs":
            assert any(
                right.split("/")[0] == "jobs" and model_matches(right, topic)
                for right in read.filters
            ), topic


@fuzz(300)
@given(items=st.lists(st.text(alphabet="ab/#+ \t", max_size=8), max_size=6))
def test_read_rights_parse_the_same_from_a_list_or_a_comma_separated_text(
    items: list[str],
) -> None:
    """ReadRights.parse strips and drops empty items, from a text or a list."""
    expected = tuple(item.strip() for item in items if item.strip())
    assert ReadRights.parse(items).filters == expected
    assert ReadRights.parse(",".join(items)).filters == expected


@fuzz(1000)
@given(text=messages, max_subscriptions=st.integers(1, 100), limit=limits)
def test_any_message_is_an_operation_or_a_documented_error_frame(
    text: str, max_subscriptions: int, limit: dict[str, int]
) -> None:
    """parse_operation raises only ClientError, and its error frame is documented."""
    try:
        operation = parse_operation(
            text,
            max_subscriptions=max_subscriptions,
            max_topic_length=limit["max_length"],
            max_topic_depth=limit["max_depth"],
        )
    except ClientError as exc:
        note(f"error {exc.code}")
        assert exc.code in ERROR_CODES, exc.code
        message = decoded_frame(error_frame(exc.code, str(exc), request_ref(text)))
        assert message["type"] == "error" and message["code"] == exc.code
        assert isinstance(message["message"], str) and message["message"]
        if "ref" in message:
            assert orjson.loads(text)["ref"] == message["ref"]
        return
    note(f"operation {type(operation).__name__}")
    ref = operation.ref
    assert ref is None or type(ref) is int or (isinstance(ref, str) and len(ref) <= 64)
    if isinstance(operation, Subscribe | Unsubscribe):
        filters = operation.filters
        assert 0 < len(filters) <= max_subscriptions
        assert len(set(filters)) == len(filters)
        assert all(
            model_filter(f, limit["max_length"], limit["max_depth"]) for f in filters
        )
        answer = decoded_frame(
            control_frame("subscribed", topics=list(filters), ref=ref)
        )
        assert answer["topics"] == list(filters)
    if isinstance(operation, Subscribe):
        for topic, offset in operation.offsets.items():
            assert model_topic(topic, limit["max_length"], limit["max_depth"])
            assert type(offset) is int and offset >= 0
            assert any(model_matches(f, topic) for f in operation.filters)
    if isinstance(operation, Authenticate):
        assert 0 < len(operation.token) <= 8192
    assert isinstance(operation, Subscribe | Unsubscribe | Ping | Authenticate)
    assert decoded_frame(control_frame("pong", ref=ref)).get("ref") == ref


@fuzz(1000)
@given(
    body=bodies,
    max_batch=st.integers(1, 5),
    limit=limits,
    max_bytes=st.integers(256, 2048),
    offset=st.integers(1, 2**63 - 1),
)
def test_any_publish_body_gives_drafts_that_round_trip_or_a_client_error(
    body: bytes,
    max_batch: int,
    limit: dict[str, int],
    max_bytes: int,
    offset: int,
) -> None:
    """parse_drafts raises only documented client errors; drafts encode faithfully."""
    try:
        drafts = parse_drafts(
            body,
            max_topic_length=limit["max_length"],
            max_topic_depth=limit["max_depth"],
            max_batch=max_batch,
        )
    except ClientError as exc:
        note(f"refused {exc.code}")
        assert isinstance(exc, BadRequest | BadTopic | TooLarge)
        assert exc.code in PUBLISH_CODES, exc.code
        return
    assert 0 < len(drafts) <= max_batch
    for draft in drafts:
        assert model_topic(draft.topic, limit["max_length"], limit["max_depth"])
        assert isinstance(draft.source, str) and 0 < len(draft.source) <= 128
        assert draft.source.isprintable(), draft.source
        # UPPER_SNAKE_CASE: a capital first, no empty word between underscores.
        kind = draft.type
        assert len(kind) <= 64 and re.fullmatch(r"[A-Z][A-Z0-9_]*", kind), kind
        assert "__" not in kind and not kind.endswith("_"), kind
        assert isinstance(draft.details, dict)
        check_round_trip(draft, max_bytes, offset)


def check_round_trip(draft: Any, max_bytes: int, offset: int) -> None:
    """Encode one draft; it must decode to itself, within the size limit."""
    try:
        size = expected_size(draft.topic, draft.source, draft.type, draft.details)
    except orjson.JSONEncodeError:
        size = None
    try:
        encoded = encode(draft, max_bytes=max_bytes)
    except TooLarge:
        note("draft too large")
        assert size is not None and size > max_bytes
        return
    except BadRequest:
        note("draft not encodable")
        # Only what orjson cannot write back (nesting past its limit) is refused.
        assert size is None
        return
    note("draft encoded")
    assert size is not None and size <= max_bytes
    stamped = encoded.with_offset(offset)
    assert len(stamped.payload) <= max_bytes
    body = decoded_frame(stamped.frame)
    assert body == orjson.loads(stamped.payload)
    assert body == {
        "type": "event",
        "topic": draft.topic,
        "offset": offset,
        "id": encoded.id,
        "publishedAt": body["publishedAt"],
        "eventSource": draft.source,
        "eventType": draft.type,
        "eventDetails": draft.details,
    }
    published = datetime.fromisoformat(body["publishedAt"]).timestamp()
    assert abs(published - encoded.published_at) < 1e-5
    rebuilt = decode_event(stamped.payload)
    assert (rebuilt.topic, rebuilt.offset, rebuilt.id) == (
        draft.topic,
        offset,
        encoded.id,
    )
    assert rebuilt.frame == text_frame(stamped.payload) == stamped.frame


@fuzz(500)
@given(body=fixture_bodies)
def test_any_webhook_body_is_a_fixture_event_or_bad_request(body: bytes) -> None:
    """parse_fixture_event raises only BadRequest, whatever the body."""
    with contextlib.suppress(BadRequest):
        parse_fixture_event(body)


@dataclass
class FuzzTarget:
    """The module's gateway, its log and a subscriber that must keep receiving."""

    gateway: Gateway
    log: LogWatch
    bystander: ClientConnection
    topic: str
    published: int = 0

    def check_alive(self) -> None:
        """The gateway still runs, logs no error and delivers to the bystander."""
        assert self.gateway.process.poll() is None, self.gateway.log()[-5000:]
        response = httpx.post(
            f"{self.gateway.http_url}/events",
            json=event(self.topic, self.published),
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=timeout(10),
        )
        assert response.status_code == 200, response.text
        self.published += 1
        message = orjson.loads(self.bystander.recv(timeout=timeout(5)))
        assert message["type"] == "event", message
        assert message["eventDetails"]["n"] == self.published - 1, message
        assert message["offset"] == self.published, message
        self.log.assert_clean()


@pytest.fixture(scope="module", params=["memory", "redis"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzTarget]:
    """A gateway logging at DEBUG, with an Origin allow-list, and its bystander."""
    tmp_path = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    with backend_environment(request.param):
        port = free_port()
        gateway = start_gateway(
            tmp_path,
            port=port,
            log_level="debug",
            jwt_secret=JWT_SECRET,
            allowed_origins=f"http://127.0.0.1:{port},https://app.example",
        )
        try:
            topic = f"fuzz/{uuid.uuid4().hex[:8]}/bystander"
            # No pings of its own: websockets draws their payloads from the
            # random module in a thread, which hypothesis takes for a strategy
            # using it. It still answers the gateway's pings.
            with connect(
                gateway.ws_url, open_timeout=timeout(5), ping_interval=None
            ) as bystander:
                assert (
                    orjson.loads(bystander.recv(timeout=timeout(5)))["type"]
                    == "welcome"
                )
                bystander.send(
                    orjson.dumps({"op": "subscribe", "topics": [topic]}).decode()
                )
                answer = orjson.loads(bystander.recv(timeout=timeout(5)))
                assert answer["type"] == "subscribed", answer
                yield FuzzTarget(gateway, LogWatch(gateway.log_path), bystander, topic)
        finally:
            gateway.stop()


async def _play(
    port: int, frames: list[WireFrame], splits: list[bool]
) -> tuple[list[Frame], str]:
    """Send the frames, then read until the end ping's pong, a close or the end.

    Returns:
        The frames read after the welcome, and how reading stopped: ``pong``,
        ``close``, ``eof`` or ``reset``.
    """
    client = await RawWebSocket.opened(port)
    try:
        chunk = b""
        try:
            for frame, split in zip(frames, splits, strict=True):
                chunk += frame.encode()
                if split:
                    await client.send(chunk)
                    chunk = b""
                    await asyncio.sleep(0)
            await client.send(chunk)
        except (BrokenPipeError, ConnectionResetError):
            # The gateway may end the connection before it has read everything.
            pass
        received: list[Frame] = []
        while True:
            try:
                frame = await client.recv_frame(10)
            except ConnectionResetError:
                return received, "reset"
            except ConnectionError:
                return received, "eof"
            if frame.opcode == OP_PONG:
                continue
            received.append(frame)
            if frame.opcode == OP_CLOSE:
                return received, "close"
            if frame.opcode == OP_TEXT and frame.json().get("ref") == END_REF:
                return received, "pong"
    finally:
        client.close()


def check_answers(received: list[Frame], expected: Expected, how: str) -> None:
    """The frames the gateway sent match what the sequence calls for."""
    answers = 0
    for frame in received:
        assert frame.fin and not frame.rsv1, frame
        if frame.opcode == OP_CLOSE:
            continue
        assert frame.opcode == OP_TEXT, frame
        message = frame.json()
        assert message["type"] in SERVER_TYPES, message
        if message["type"] == "error":
            assert message["code"] in ERROR_CODES, message
            assert isinstance(message["message"], str), message
        # Events, gaps and resume notes follow a subscribe; they answer nothing.
        if message["type"] not in ("event", "gap") and message.get("code") not in (
            "offset_ahead",
            "unavailable",
        ):
            answers += 1
    assert answers <= expected.messages, (answers, expected)
    if not expected.close_codes:
        assert how == "pong", (how, received[-1:])
        assert answers == expected.messages, (answers, expected)
        return
    if how == "reset" and expected.echo:
        # Closing a socket with unread input makes the kernel send RST, which can
        # beat the echoed close frame; that is TCP, not the gateway.
        return
    assert how == "close", (how, expected, received[-3:])
    code = received[-1].close_code
    assert code in expected.close_codes, (code, expected)
    assert code in CLOSE_CODES or expected.echo, code


@fuzz(25, over_sockets=True)
@given(sequence=frame_sequences())
def test_any_frame_sequence_gets_documented_answers_and_close_codes(
    target: FuzzTarget, sequence: tuple[list[WireFrame], list[bool]]
) -> None:
    """Any frames get answers or a documented close; others keep receiving."""
    frames, splits = sequence
    expected = expected_outcome(frames)
    received, how = asyncio.run(_play(target.gateway.port, frames, splits))
    code = received[-1].close_code if how == "close" else None
    note(f"ended by {how} {code or ''}".strip())
    check_answers(received, expected, how)
    target.check_alive()


async def _resume(target: FuzzTarget, topic: str, offset: int) -> list[dict[str, Any]]:
    """Subscribe with ``offsets``, publish one live event, return what came."""
    client = await RawWebSocket.opened(target.gateway.port)
    try:
        await client.subscribe(topic, offsets={topic: offset})
        async with httpx.AsyncClient(timeout=timeout(10)) as http:
            response = await http.post(
                f"{target.gateway.http_url}/events",
                json=event(topic, -1),
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
        assert response.status_code == 200, response.text
        live = response.json()["events"][0]["offset"]
        received = []
        while not received or received[-1].get("offset") != live:
            received.append(await client.recv_json())
        return received
    finally:
        client.close()


@fuzz(15, over_sockets=True)
@given(
    before=st.integers(0, 3),
    offset=st.integers(0, 6) | st.sampled_from([2**31, 2**63 - 1, 2**64 - 1]),
)
def test_a_resume_from_any_offset_is_followed_by_live_events(
    target: FuzzTarget, before: int, offset: int
) -> None:
    """A resume replays what follows its offset, then live events, none lost."""
    topic = f"fuzz/{uuid.uuid4().hex[:12]}/resume"
    for number in range(before):
        response = httpx.post(
            f"{target.gateway.http_url}/events",
            json=event(topic, number),
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=timeout(10),
        )
        assert response.status_code == 200, response.text
    received = asyncio.run(_resume(target, topic, offset))
    events = [m["offset"] for m in received if m["type"] == "event"]
    assert events == list(range(min(offset, before) + 1, before + 2)), received
    notes = [m.get("code") for m in received if m["type"] != "event"]
    assert notes == (["offset_ahead"] if offset > before else []), received
    target.check_alive()


async def _upgrade(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one upgrade request; return the status, headers and what followed."""
    sock = await open_socket(port)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, request)
        received = b""
        async with asyncio.timeout(timeout(5)):
            while b"\r\n\r\n" not in received:
                chunk = await loop.sock_recv(sock, 65536)
                assert chunk, f"no answer to {request!r}: {received!r}"
                received += chunk
            head, _, rest = received.partition(b"\r\n\r\n")
            response = parse_response(head)
            if response.status == 101:
                while not FrameParser().feed(rest):
                    chunk = await loop.sock_recv(sock, 65536)
                    assert chunk, "no welcome after 101"
                    rest += chunk
            else:
                length = int(response.header("content-length") or 0)
                while len(rest) < length:
                    chunk = await loop.sock_recv(sock, 65536)
                    if not chunk:
                        break
                    rest += chunk
    finally:
        sock.close()
    return response.status, response.headers, rest


@fuzz(25, over_sockets=True)
@given(data=st.data())
def test_any_upgrade_request_gets_a_documented_status(
    target: FuzzTarget, data: st.DataObject
) -> None:
    """Odd or repeated upgrade headers get 101 and a welcome, or a JSON refusal."""
    port = target.gateway.port
    request = data.draw(upgrade_requests(port))
    status, headers, rest = asyncio.run(_upgrade(port, request))
    note(f"status {status}")
    assert status in (101, 307, 400, 401, 403, 404, 426, 429, 503), (status, request)
    if status == 101:
        assert FrameParser().feed(rest)[0].json()["type"] == "welcome"
    elif headers.get("content-type") == "application/json":
        body = orjson.loads(rest)
        assert isinstance(body["error"]["code"], str), body
    else:
        # Only uvicorn and Starlette answer what is not an upgrade request: 400
        # for bad HTTP, and for a plain GET 426, or 307 from '/ws/' to '/ws'.
        assert status in (307, 400, 404, 426), (status, headers, rest)
    target.check_alive()


# Regressions: one test per bug the fuzzing found, each fixed.


def test_regression_a_right_with_hash_before_its_end_covers_nothing() -> None:
    """A right such as 'stocks/#/x' breaks the grammar and grants nothing."""
    assert not filter_covers("stocks/#/x", "stocks/AAPL")
    assert not filter_covers("#/a", "a")
    assert not ReadRights.parse("stocks/#/x").allows("stocks/AAPL")
    assert filter_covers("stocks/#", "stocks/AAPL")


def test_regression_core_log_keeps_errors_and_formats_any_frame(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The core's INFO goes to DEBUG without traceback, ERROR stays, frames format."""
    caplog.set_level(logging.DEBUG, logger="gateway.transports.websocket.core")
    try:
        raise ValueError("a client's bad handshake")
    except ValueError:
        _core_logger.debug("! invalid handshake", exc_info=True)
        _core_logger.error("parser failed", exc_info=True)
    _core_logger.info("connection open")
    for payload in (b"\x03", b"\x03\xe8\xff", struct.pack("!H", 999)):
        _core_logger.debug("< %s", CoreFrame(Opcode.CLOSE, payload))
    _core_logger.debug("< %s", CoreFrame(Opcode.TEXT, b"\xff"))
    records = caplog.records
    assert [record.levelno for record in records] == [
        logging.DEBUG,
        logging.ERROR,
        *[logging.DEBUG] * 5,
    ]
    assert records[0].exc_info is None and records[1].exc_info is not None
    shown = [record.getMessage() for record in records[3:]]
    assert shown == [
        f"< {kind} (malformed) [{size} bytes]"
        for kind, size in [("CLOSE", 1), ("CLOSE", 3), ("CLOSE", 2), ("TEXT", 1)]
    ]


def test_regression_malformed_close_and_text_frames_log_no_traceback(
    target: FuzzTarget,
) -> None:
    """A short close, a bad close code or reason, or non-UTF-8 text log cleanly."""
    end = WireFrame(OP_TEXT, orjson.dumps({"op": "ping", "ref": END_REF}))
    for frame, code in [
        (WireFrame(OP_CLOSE, b"\x03"), 1002),
        (WireFrame(OP_CLOSE, struct.pack("!H", 999)), 1002),
        (WireFrame(OP_CLOSE, b"\x03\xe8\xff"), 1007),
        (WireFrame(OP_TEXT, b"\xff"), 1007),
    ]:
        received, how = asyncio.run(
            _play(target.gateway.port, [frame, end], [True, True])
        )
        assert how == "close" and received[-1].close_code == code, received
        target.check_alive()


def plain_upgrade(port: int, *extra: tuple[str, str], key: bool = True) -> bytes:
    """A correct upgrade request to /ws with ``extra`` headers."""
    lines = [
        "GET /ws HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        *([f"Sec-WebSocket-Key: {UPGRADE_KEY}"] if key else []),
        *(f"{name}: {value}" for name, value in extra),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_regression_a_repeated_origin_or_authorization_gets_400(
    target: FuzzTarget,
) -> None:
    """Two Origin or two Authorization headers get a JSON 400, not a dropped socket."""
    port = target.gateway.port
    origin = f"http://127.0.0.1:{port}"
    for name, values in [
        ("Origin", [origin, origin]),
        ("Origin", [origin, "http://evil"]),
        ("Authorization", ["Bearer x", "Bearer y"]),
    ]:
        request = plain_upgrade(port, *((name, value) for value in values))
        status, _, body = asyncio.run(_upgrade(port, request))
        assert status == 400, (status, body)
        error = orjson.loads(body)["error"]
        assert error == {
            "code": "bad_request",
            "message": f"more than one {name} header",
        }
        target.check_alive()


def test_regression_a_bad_handshake_logs_no_traceback(target: FuzzTarget) -> None:
    """An upgrade without Sec-WebSocket-Key gets 400 and no logged traceback."""
    port = target.gateway.port
    status, _, _ = asyncio.run(_upgrade(port, plain_upgrade(port, key=False)))
    assert status == 400
    target.check_alive()


def test_regression_live_events_follow_a_resume_ahead_of_the_topic(
    target: FuzzTarget,
) -> None:
    """After offset_ahead, live events arrive though their offsets are lower."""
    topic = f"fuzz/{uuid.uuid4().hex[:12]}/ahead"
    for number in range(2):
        response = httpx.post(
            f"{target.gateway.http_url}/events",
            json=event(topic, number),
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=timeout(10),
        )
        assert response.status_code == 200, response.text
    received = asyncio.run(_resume(target, topic, 41))
    assert [(m["type"], m.get("code"), m.get("offset")) for m in received] == [
        ("error", "offset_ahead", None),
        ("event", None, 3),
    ]
    target.check_alive()


async def _reauthenticate(port: int, token: str) -> list[dict[str, Any]]:
    """Subscribe to 'a' and 'b', send ``token``, return what came before a pong."""
    client = await RawWebSocket.opened(port)
    try:
        await client.subscribe("a", "b")
        await client.send_json({"op": "auth", "token": token, "ref": 7})
        await client.send_json({"op": "ping", "ref": END_REF})
        received = []
        while not received or received[-1].get("ref") != END_REF:
            received.append(await client.recv_json())
        return received
    finally:
        client.close()


def test_regression_an_auth_that_drops_filters_gets_one_answer(
    target: FuzzTarget,
) -> None:
    """A fresh token with fewer rights gets 'authenticated' alone, naming dropped."""
    token = jwt.encode(
        {"sub": "fuzz-user", "exp": 10**12, "topics": ["a"]},
        JWT_SECRET,
        algorithm="HS256",
    )
    received = asyncio.run(_reauthenticate(target.gateway.port, token))
    assert [message["type"] for message in received] == ["authenticated", "pong"]
    assert received[0]["dropped"] == ["b"] and received[0]["ref"] == 7, received
    target.check_alive()


def test_a_token_whose_alg_is_a_list_is_unauthorized() -> None:
    """A token whose header names its algorithm as a list is refused, not a crash."""
    verifier = TokenVerifier(JWT_SECRET, None)
    for alg in (["HS256"], {"HS256": 1}):
        with pytest.raises(Unauthorized):
            verifier.verify(forged({"alg": alg}, {"sub": "u", "exp": 10**12}))


def test_the_fuzzed_gateway_stops_cleanly(target: FuzzTarget) -> None:
    """After the fuzzing, SIGTERM ends the gateway with status 0 and a clean log."""
    target.check_alive()
    assert target.gateway.stop() == 0
    target.log.assert_clean()
