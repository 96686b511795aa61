"""Subscriber tokens and read permissions (C11), over real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from support import (
    Gateway,
    assert_no_error_logged,
    event,
    publish,
    read_metrics,
    running_gateway,
    timeout,
    ws_client,
)
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.errors import Unauthorized
from gateway.security import ReadRights, TokenVerifier, filter_covers

SECRET = "a-shared-secret-of-at-least-32-characters"


def token(
    topics: list[str] | str,
    *,
    seconds: float = 60,
    subject: str = "fan-1",
    key: Any = SECRET,
    algorithm: str = "HS256",
) -> str:
    """A signed subscriber token that expires ``seconds`` from now."""
    claims = {"sub": subject, "exp": time.time() + seconds, "topics": topics}
    return jwt.encode(claims, key, algorithm=algorithm)


# Pure logic.


@pytest.mark.parametrize(
    ("right", "topic_filter", "covered"),
    [
        ("stocks/#", "stocks/AAPL", True),
        ("stocks/#", "stocks/+", True),
        ("stocks/#", "stocks/#", True),
        ("stocks/#", "stocks", True),
        ("stocks/#", "#", False),
        ("stocks/#", "+/AAPL", False),
        ("stocks/+", "stocks/AAPL", True),
        ("stocks/+", "stocks/#", False),
        ("stocks/+", "stocks/AAPL/x", False),
        ("teams/ARG", "teams/ARG", True),
        ("teams/ARG", "teams/+", False),
        ("#", "anything/at/all", True),
        ("+/x", "a/x", True),
        ("+/x", "a/#", False),
    ],
)
def test_a_right_covers_a_filter_by_what_it_could_match(
    right: str, topic_filter: str, covered: bool
) -> None:
    """A filter is covered only if every topic it could match is in the right."""
    assert filter_covers(right, topic_filter) is covered


def test_job_topics_need_their_id_or_a_right_in_the_jobs_tree() -> None:
    """``#`` does not hand out job ids; an exact job topic needs no right."""
    everything = ReadRights.parse("#")
    assert everything.allows("stocks/AAPL") and everything.allows("teams/+")
    for refused in ("#", "jobs/+", "jobs/#", "+/0f3a", "+/+"):
        assert not everything.allows(refused), refused
    assert everything.allows("jobs/0f3a9c")
    assert ReadRights.parse("stocks/#").allows("jobs/0f3a9c")
    operator = ReadRights.parse("#,jobs/#")
    assert operator.allows("#") and operator.allows("jobs/+")


def _keys_file(tmp_path: Path, *keys: Any) -> str:
    pem = b"".join(
        key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        for key in keys
    )
    path = tmp_path / "keys.pem"
    path.write_bytes(pem)
    return str(path)


def test_tokens_of_each_algorithm_and_their_refusals(tmp_path: Path) -> None:
    """HS256 by the secret, RS256 and ES256 by any listed public key."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    verifier = TokenVerifier(SECRET, _keys_file(tmp_path, rsa_key, ec_key))
    for key, algorithm in ((SECRET, "HS256"), (rsa_key, "RS256"), (ec_key, "ES256")):
        grant = verifier.verify(token(["stocks/#"], key=key, algorithm=algorithm))
        assert grant.subject == "fan-1"
        assert grant.rights.allows("stocks/AAPL")
        assert 59 < grant.seconds_left() <= 60
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = {
        "expired": token(["#"], seconds=-1),
        "other secret": token(["#"], key="another-secret-of-at-least-32-chars!"),
        "other key": token(["#"], key=stranger, algorithm="RS256"),
        "no topics": jwt.encode({"sub": "x", "exp": time.time() + 60}, SECRET),
        "no sub": jwt.encode({"exp": time.time() + 60, "topics": ["#"]}, SECRET),
        "bad filter": token(["stocks/#", "a b"]),
        "misplaced #": token(["stocks/#/x"]),
        "unsigned": jwt.encode({"sub": "x", "exp": time.time() + 60}, None, "none"),
        "garbage": "not.a.token",
    }
    for what, bad_token in bad.items():
        with pytest.raises(Unauthorized):
            verifier.verify(bad_token)
            pytest.fail(f"{what} accepted")


# Integration: C11.


async def _record(client: Any, into: list[dict[str, Any]]) -> int | None:
    """Collect events until the server closes; return its close code."""
    try:
        while True:
            message = orjson.loads(await client.connection.recv())
            if message.get("type") == "event":
                into.append(message)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def _publish_steadily(
    http: httpx.AsyncClient, gateway: Gateway, topic: str, times: dict[str, float]
) -> None:
    """Publish ten events a second, noting when each was accepted."""
    number = 0
    while True:
        response = await publish(http, gateway, event(topic, number))
        assert response.status_code == 200
        times[response.json()["events"][0]["id"]] = time.time()
        number += 1
        await asyncio.sleep(0.1)


async def test_c11_token_expiry_closes_the_connection(
    tmp_path: Path, backend: str, http: httpx.AsyncClient
) -> None:
    """C11: a 5 s token ends the connection with 4001 within 1 s of expiry."""
    topic = "stocks/C11"
    with running_gateway(tmp_path, jwt_secret=SECRET) as gateway:
        short = token(["stocks/#"], seconds=5)
        expires_at = jwt.decode(short, SECRET, algorithms=["HS256"])["exp"]
        headers = {"Authorization": f"Bearer {short}"}
        accepted: dict[str, float] = {}
        async with ws_client(gateway, additional_headers=headers) as client:
            await client.subscribe(topic)
            publisher = asyncio.create_task(
                _publish_steadily(http, gateway, topic, accepted)
            )
            received: list[dict[str, Any]] = []
            try:
                code = await asyncio.wait_for(_record(client, received), timeout(10))
                closed_at = time.time()
                await asyncio.sleep(0.5)
            finally:
                publisher.cancel()
        assert code == 4001
        assert closed_at - expires_at < 1.0, closed_at - expires_at
        assert len(received) >= 30
        # Nothing accepted after the expiry reached the client.
        assert all(accepted[e["id"]] <= expires_at + 0.05 for e in received)
        assert any(when > expires_at + 0.2 for when in accepted.values())
        assert_no_error_logged(gateway)


async def test_c11_refreshed_token_keeps_the_connection(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """C11: a client that refreshes 2 s before expiry keeps receiving past it."""
    topic = "stocks/C11R"
    with running_gateway(tmp_path, jwt_secret=SECRET) as gateway:
        first = token(["stocks/#"], seconds=4)
        headers = {"Authorization": f"Bearer {first}"}
        async with ws_client(gateway, additional_headers=headers) as client:
            await client.subscribe(topic)
            await asyncio.sleep(2)
            await client.send({"op": "auth", "token": token(["stocks/#"]), "ref": 1})
            answer = await client.recv()
            assert answer["type"] == "authenticated" and answer["ref"] == 1, answer
            assert answer["subject"] == "fan-1" and answer["dropped"] == []
            await asyncio.sleep(3)
            response = await publish(http, gateway, event(topic, 1))
            assert response.status_code == 200
            received = await client.events(1)
        assert received[0]["id"] == response.json()["events"][0]["id"]


async def test_c11_refusals(tmp_path: Path, http: httpx.AsyncClient) -> None:
    """C11: an expired token is refused at the handshake; a subscription
    outside the token's rights gets an error frame and the socket stays open."""
    with running_gateway(tmp_path, jwt_secret=SECRET) as gateway:
        expired = token(["stocks/#"], seconds=-5)
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                gateway.ws_url,
                additional_headers={"Authorization": f"Bearer {expired}"},
            ):
                pass
        assert refused.value.response.status_code == 401
        assert b"expired" in refused.value.response.body

        headers = {"Authorization": f"Bearer {token(['stocks/#'])}"}
        async with ws_client(gateway, additional_headers=headers) as client:
            await client.send({"op": "subscribe", "topics": ["teams/ARG"], "ref": 7})
            error = await client.recv()
            assert error["type"] == "error" and error["code"] == "forbidden", error
            assert error["ref"] == 7
            # Still open and still allowed what the token grants.
            await client.subscribe("stocks/AAPL")
            teams = await publish(http, gateway, event("teams/ARG"))
            stocks = await publish(http, gateway, event("stocks/AAPL"))
            assert teams.status_code == stocks.status_code == 200
            received = await client.events(1)
            assert received[0]["id"] == stocks.json()["events"][0]["id"]
            # A fresh token for someone else is refused; the connection stays.
            other = token(["#"], subject="someone-else")
            await client.send({"op": "auth", "token": other})
            error = await client.recv()
            assert error["code"] == "forbidden", error
        samples = await read_metrics(http, gateway)
        assert samples['gateway_refused_connections_total{reason="unauthorized"}'] == 1


async def test_anonymous_rights_and_job_topics(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Without a token: the anonymous rights, jobs by full id only; a token
    may come as a query parameter, as browsers send it."""
    with running_gateway(tmp_path, jwt_secret=SECRET) as gateway:
        async with ws_client(gateway) as client:
            for refused in ("#", "jobs/+", "+/0f3a"):
                await client.send({"op": "subscribe", "topics": [refused]})
                error = await client.recv()
                assert error["code"] == "forbidden", (refused, error)
            await client.subscribe("jobs/0f3a9c", "stocks/#")
        url = f"{gateway.ws_url}?access_token={token(['jobs/#', '#'])}"
        async with connect(url) as connection:
            assert orjson.loads(await connection.recv())["type"] == "welcome"
            await connection.send(
                orjson.dumps({"op": "subscribe", "topics": ["#"]}).decode()
            )
            answer = orjson.loads(await connection.recv())
            assert answer["type"] == "subscribed", answer


async def test_anonymous_access_switched_off(tmp_path: Path) -> None:
    """With no anonymous rights a client without a token gets 401."""
    with running_gateway(tmp_path, jwt_secret=SECRET, anonymous_read="") as gateway:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(gateway.ws_url):
                pass
        assert refused.value.response.status_code == 401
        body = orjson.loads(refused.value.response.body)
        assert body["error"]["code"] == "unauthorized"
        headers = {"Authorization": f"Bearer {token(['stocks/#'])}"}
        async with ws_client(gateway, additional_headers=headers) as client:
            assert client.welcome["type"] == "welcome"


async def test_topic_polling_reads_by_the_same_rights(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Polling a topic applies the anonymous rights and tokens as subscribing
    does: refused without a token where none is allowed, 403 outside the
    token's topics, jobs by their id; a token comes as a header or in the query."""
    settings = {"jwt_secret": SECRET, "anonymous_read": "stocks/#"}
    with running_gateway(tmp_path, **settings) as gateway:
        await publish(http, gateway, [event("stocks/AAPL", 1), event("teams/ARG", 2)])

        async def poll(topic: str, **kwargs: Any) -> httpx.Response:
            url = f"{gateway.http_url}/topics/{topic}/events"
            return await http.get(url, **kwargs)

        fan = {"Authorization": f"Bearer {token(['teams/#'])}"}
        answers = {
            "anonymous stocks": await poll("stocks/AAPL"),
            "anonymous teams": await poll("teams/ARG"),
            "anonymous job": await poll("jobs/0f3a9c"),
            "token teams": await poll("teams/ARG", headers=fan),
            "token stocks": await poll("stocks/AAPL", headers=fan),
            "query token": await poll(
                "teams/ARG", params={"access_token": token(["teams/ARG"])}
            ),
            "expired token": await poll(
                "teams/ARG",
                headers={"Authorization": f"Bearer {token('#', seconds=-5)}"},
            ),
        }
        assert_no_error_logged(gateway)
    statuses = {name: a.status_code for name, a in answers.items()}
    assert statuses == {
        "anonymous stocks": 200,
        "anonymous teams": 403,
        "anonymous job": 200,
        "token teams": 200,
        "token stocks": 403,
        "query token": 200,
        "expired token": 401,
    }
    assert answers["anonymous teams"].json()["error"]["code"] == "forbidden"
    assert answers["expired token"].headers["WWW-Authenticate"] == "Bearer"
    assert [
        e["eventDetails"]["n"] for e in answers["token teams"].json()["events"]
    ] == [2]


async def test_topic_polling_without_anonymous_rights_needs_a_token(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """With --anonymous-read empty, a poll without a token gets a JSON 401."""
    with running_gateway(tmp_path, jwt_secret=SECRET, anonymous_read="") as gateway:
        url = f"{gateway.http_url}/topics/stocks/AAPL/events"
        refused = await http.get(url)
        allowed = await http.get(
            url, headers={"Authorization": f"Bearer {token(['stocks/#'])}"}
        )
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    assert allowed.status_code == 200


# Integration: who may connect, how many, how fast.


async def _status_of_upgrade(gateway: Gateway, **kwargs: Any) -> int:
    """101 if the upgrade succeeds, else the refusal's status."""
    try:
        async with connect(gateway.ws_url, **kwargs):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


async def test_origin_allow_list(tmp_path: Path, http: httpx.AsyncClient) -> None:
    """A browser page of another origin is refused with 403; listed ones and
    clients that send no Origin (not browsers) get in."""
    origins = "https://fans.example, http://localhost:3000"
    with running_gateway(tmp_path, allowed_origins=origins) as gateway:
        assert await _status_of_upgrade(gateway, origin="https://evil.example") == 403
        assert await _status_of_upgrade(gateway, origin="https://fans.example") == 101
        assert await _status_of_upgrade(gateway, origin="http://localhost:3000") == 101
        assert await _status_of_upgrade(gateway) == 101
        samples = await read_metrics(http, gateway)
        key = 'gateway_refused_connections_total{reason="origin_not_allowed"}'
        assert samples[key] == 1


async def test_connection_limits(tmp_path: Path, http: httpx.AsyncClient) -> None:
    """Per address (429), per replica (503); a closed connection frees its slot."""
    with running_gateway(
        tmp_path, max_connections=3, max_connections_per_address=2
    ) as gateway:
        async with connect(gateway.ws_url), connect(gateway.ws_url):
            assert await _status_of_upgrade(gateway) == 429
        # Both closed: their slots are free again.
        async with connect(gateway.ws_url), connect(gateway.ws_url):
            pass
    with running_gateway(tmp_path, max_connections=2) as gateway:
        async with connect(gateway.ws_url), connect(gateway.ws_url):
            assert await _status_of_upgrade(gateway) == 503
        samples = await read_metrics(http, gateway)
        key = 'gateway_refused_connections_total{reason="too_many_connections"}'
        assert samples[key] == 1


async def test_connect_rate_limit(tmp_path: Path) -> None:
    """Past a burst of twice the rate, new connections get 429 until it refills."""
    with running_gateway(tmp_path, max_connects_per_second=2) as gateway:
        statuses = [await _status_of_upgrade(gateway) for _ in range(6)]
        assert statuses[:4] == [101] * 4, statuses
        assert 429 in statuses[4:], statuses
        await asyncio.sleep(1.1)
        assert await _status_of_upgrade(gateway) == 101
