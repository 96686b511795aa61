"""The signed fixtures webhook: signatures, timestamps, payloads and repeats (C13)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from support import (
    Gateway,
    assert_no_error_logged,
    running_gateway,
    timeout,
    ws_client,
)

from gateway.errors import BadRequest, Unauthorized
from gateway.ingress import webhooks
from gateway.ingress.webhooks import (
    WebhookReceiver,
    parse_fixture_event,
)

SECRET = "test-webhook-secret-0123456789"
FIXTURE_TOPIC = "fixtures/2022-12-18/ARG-FRA"


def sign(
    body: bytes, *, secret: str = SECRET, at: float | None = None
) -> dict[str, str]:
    """The headers a sender puts on ``body``, signed at ``at`` (default now)."""
    timestamp = str(int(time.time() if at is None else at))
    digest = hmac.new(
        secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    return {
        "X-Webhook-Timestamp": timestamp,
        "X-Webhook-Signature": f"sha256={digest}",
        "Content-Type": "application/json",
    }


def payload(event_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid key event of the 2022 final."""
    item: dict[str, Any] = {
        "id": event_id or uuid.uuid4().hex,
        "type": "GOAL_SCORED",
        "fixture": {"date": "2022-12-18", "home": "ARG", "away": "FRA"},
        "minute": 36,
        "details": {"team": "ARG", "player": "Ángel Di María", "score": "2-0"},
    }
    item.update(overrides)
    return item


async def deliver(
    http: httpx.AsyncClient, gateway: Gateway, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    return await http.post(
        f"{gateway.http_url}/webhooks/fixtures", content=body, headers=headers
    )


def assert_json_401(response: httpx.Response, words: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "unauthorized"
    assert words in error["message"], error


# C13.


@pytest.mark.timeout(90)
async def test_c13_signatures_cover_the_exact_bytes_received(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """C13: a body with extra spaces, reordered keys and \\u00e9 escapes, signed over
    those bytes, is published once; compacted with the old signature it gets 401;
    the same request 10 s later publishes nothing new; a 10-minute-old timestamp and
    a missing or garbled header get a JSON 401; subscribers see only the one event."""
    event_id = f"c13-{uuid.uuid4().hex}"
    body = (
        b'{  "minute" :   80 ,\n  "type":"PENALTY_SCORED",\n'
        b'  "details" : { "team" : "FRA", "player" : "Kylian Mbapp\\u00e9",'
        b' "score":"2-1" },\n'
        b'  "fixture": {"away": "FRA",   "date": "2022-12-18", "home": "ARG"},\n'
        b'  "id" : "' + event_id.encode() + b'"   }\n'
    )
    with running_gateway(tmp_path, webhook_secret=SECRET) as gateway:
        async with ws_client(gateway) as fixture_ws, ws_client(gateway) as team_ws:
            await fixture_ws.subscribe(FIXTURE_TOPIC)
            await team_ws.subscribe("teams/FRA", "teams/ARG")
            headers = sign(body)

            accepted = await deliver(http, gateway, body, headers)
            assert accepted.status_code == 200, accepted.text
            assert accepted.json()["duplicate"] is False
            [received] = await fixture_ws.events(1)
            assert received["eventType"] == "PENALTY_SCORED"
            assert received["eventDetails"]["details"]["player"] == "Kylian Mbappé"
            assert received["eventDetails"]["eventId"] == event_id
            team_events = await team_ws.events(2)
            assert {e["topic"] for e in team_events} == {"teams/FRA", "teams/ARG"}

            # The same JSON value, compacted: the bytes differ, so the old
            # signature does not cover them.
            compact = orjson.dumps(orjson.loads(body))
            assert orjson.loads(compact) == orjson.loads(body)
            refused = await deliver(http, gateway, compact, headers)
            assert_json_401(refused, "signature does not match")

            # A valid signature made ten minutes ago (for an id never seen).
            fresh = payload()
            stale_body = orjson.dumps(fresh)
            stale = await deliver(
                http, gateway, stale_body, sign(stale_body, at=time.time() - 600)
            )
            assert_json_401(stale, "over the tolerance")

            # Missing and garbled signature headers.
            fresh_body = orjson.dumps(payload())
            good = sign(fresh_body)
            garbled: list[dict[str, str]] = [
                {k: v for k, v in good.items() if k != "X-Webhook-Signature"},
                {k: v for k, v in good.items() if k != "X-Webhook-Timestamp"},
                {**good, "X-Webhook-Signature": "sha256=not-hex"},
                {**good, "X-Webhook-Signature": good["X-Webhook-Signature"][7:]},
                {**good, "X-Webhook-Signature": "md5=" + "0" * 64},
                {**good, "X-Webhook-Signature": ""},
                {**good, "X-Webhook-Timestamp": "yesterday"},
            ]
            for headers_case in garbled:
                response = await deliver(http, gateway, fresh_body, headers_case)
                assert response.status_code == 401, (headers_case, response.text)
                assert response.json()["error"]["code"] == "unauthorized"

            # The first request again, as captured, 10 s later: its timestamp is
            # still within tolerance, but its event id was accepted already.
            await asyncio.sleep(10)
            replayed = await deliver(http, gateway, body, headers)
            assert replayed.status_code == 200, replayed.text
            assert replayed.json() == {"eventId": event_id, "duplicate": True}

            await fixture_ws.expect_silence(1.0)
            await team_ws.expect_silence(0.2)
        history = await http.get(f"{gateway.http_url}/topics/{FIXTURE_TOPIC}/events")
        assert [e["eventDetails"]["eventId"] for e in history.json()["events"]] == [
            event_id
        ]
        assert_no_error_logged(gateway)


def test_c13_signatures_are_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """C13: every signature check goes through hmac.compare_digest."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(webhooks.hmac, "compare_digest", spy)
    receiver = WebhookReceiver(lambda: [SECRET.encode()], tolerance=300)
    body = orjson.dumps(payload())
    receiver.verify(sign(body), body)
    with pytest.raises(Unauthorized):
        receiver.verify(sign(body, secret="another-secret-of-enough-length"), body)
    assert len(calls) == 2


def test_a_timestamp_out_of_tolerance_says_which_way() -> None:
    """A timestamp too far ahead or behind is refused, saying which and by how much."""
    receiver = WebhookReceiver(
        lambda: [SECRET.encode()], tolerance=300, clock=lambda: 1e9
    )
    body = orjson.dumps(payload())
    with pytest.raises(Unauthorized, match="600 s ahead of the gateway's clock"):
        receiver.verify(sign(body, at=1e9 + 600), body)
    with pytest.raises(Unauthorized, match="600 s behind the gateway's clock"):
        receiver.verify(sign(body, at=1e9 - 600), body)


# Payloads, repeats and settings.


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"id": None}, "'id'"),
        ({"id": "has space"}, "id:"),
        ({"type": "goal"}, "type:"),
        ({"minute": "23"}, "minute:"),
        ({"minute": 999}, "minute:"),
        ({"details": []}, "details:"),
        ({"fixture": None}, "'fixture'"),
        ({"fixture": {"home": "ARG", "away": "FRA"}}, "'fixture.date'"),
        ({"fixture": {"date": "2022-13-40", "home": "ARG", "away": "FRA"}}, "date"),
        ({"fixture": {"date": "2022-12-18", "home": "arg", "away": "FRA"}}, "home"),
        ({"fixture": {"date": "2022-12-18", "home": "ARG"}}, "'fixture.away'"),
        ({"fixture": {"date": "2022-12-18", "home": "A", "away": "B", "x": 1}}, "x"),
        ({"extra": 1}, "'extra'"),
    ],
)
def test_malformed_payloads_name_the_field(change: dict[str, Any], field: str) -> None:
    """Each malformed payload is refused with a message naming its field."""
    item = payload()
    for key, value in change.items():
        if value is None:
            item.pop(key, None)
        else:
            item[key] = value
    with pytest.raises(BadRequest) as caught:
        parse_fixture_event(orjson.dumps(item))
    assert field in str(caught.value)


async def test_bad_payload_gets_400_and_publishes_nothing(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """A signed but malformed payload gets 400 naming the field; nothing is sent."""
    with running_gateway(tmp_path, webhook_secret=SECRET) as gateway:
        async with ws_client(gateway) as ws:
            await ws.subscribe("fixtures/#", "teams/#")
            for body, words in [
                (orjson.dumps(payload(minute=-1)), "minute"),
                (orjson.dumps(payload(fixture={"date": "2022-12-18"})), "home"),
                (b"{not json", "not valid JSON"),
            ]:
                response = await deliver(http, gateway, body, sign(body))
                assert response.status_code == 400, response.text
                assert words in response.json()["error"]["message"]
            await ws.expect_silence(0.5)
        assert_no_error_logged(gateway)


async def test_without_a_secret_the_webhook_is_off(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """With no webhook secret the route answers 503 saying which setting is missing."""
    with running_gateway(tmp_path) as gateway:
        body = orjson.dumps(payload())
        response = await deliver(http, gateway, body, sign(body))
        assert response.status_code == 503, response.text
        assert "GATEWAY_WEBHOOK_SECRET" in response.json()["error"]["message"]


async def test_repeated_delivery_across_replicas_is_published_once(
    tmp_path: Path, shared_redis: str, http: httpx.AsyncClient
) -> None:
    """Two replicas on one Redis: the same event id delivered to each, and again
    re-signed later, is published once and acknowledged as a repeat after."""
    with (
        running_gateway(tmp_path, webhook_secret=SECRET) as first,
        running_gateway(tmp_path, webhook_secret=SECRET) as second,
    ):
        async with ws_client(first) as ws:
            await ws.subscribe("teams/ARG")
            body = orjson.dumps(payload())
            answers = [
                await deliver(http, first, body, sign(body)),
                await deliver(http, second, body, sign(body)),
                await deliver(http, first, body, sign(body, at=time.time() + 2)),
            ]
            assert [a.status_code for a in answers] == [200, 200, 200]
            assert [a.json()["duplicate"] for a in answers] == [False, True, True]
            await ws.events(1, seconds=timeout(5))
            await ws.expect_silence(1.0)
