"""Topic polling: GET /topics/{topic}/events after an offset, ETags, truncation."""

from __future__ import annotations

from pathlib import Path

import httpx
from support import event, publish, running_gateway


async def poll(
    http: httpx.AsyncClient, url: str, topic: str, **params: object
) -> httpx.Response:
    query = {name: str(value) for name, value in params.items()}
    return await http.get(f"{url}/topics/{topic}/events", params=query)


async def test_poll_returns_exactly_the_events_after_the_offset(
    tmp_path: Path, backend: str, http: httpx.AsyncClient, topic: str
) -> None:
    """Polling since an offset gives the events after it, in order, as published,
    with the next offset; an unchanged answer is a 304 on its ETag."""
    with running_gateway(tmp_path) as gateway:
        url = gateway.http_url
        response = await publish(http, gateway, [event(topic, n) for n in range(10)])
        assert response.status_code == 200, response.text

        answer = await poll(http, url, topic, since=3)
        assert answer.status_code == 200
        body = answer.json()
        assert [e["offset"] for e in body["events"]] == list(range(4, 11))
        assert [e["eventDetails"]["n"] for e in body["events"]] == list(range(3, 10))
        assert all(e["topic"] == topic for e in body["events"])
        assert body["nextOffset"] == 10
        assert body["lastOffset"] == 10
        assert body["truncated"] is False
        assert body["more"] is False
        assert answer.headers["cache-control"] == "private, no-cache"
        assert answer.headers["retry-after"] == "1"

        page = (await poll(http, url, topic, since=3, limit=3)).json()
        assert [e["offset"] for e in page["events"]] == [4, 5, 6]
        assert page["nextOffset"] == 6
        assert page["more"] is True

        # Caught up: nothing new, and the same answer again is a 304.
        empty = await poll(http, url, topic, since=10)
        assert empty.json()["events"] == []
        assert empty.json()["nextOffset"] == 10
        etag = empty.headers["etag"]
        again = await http.get(
            f"{url}/topics/{topic}/events",
            params={"since": "10"},
            headers={"If-None-Match": etag},
        )
        assert again.status_code == 304
        assert again.content == b""
        assert again.headers["etag"] == etag
        assert again.headers["retry-after"] == "1"

        await publish(http, gateway, event(topic, 10))
        moved = await http.get(
            f"{url}/topics/{topic}/events",
            params={"since": "10"},
            headers={"If-None-Match": etag},
        )
        assert moved.status_code == 200
        assert moved.headers["etag"] != etag
        assert [e["eventDetails"]["n"] for e in moved.json()["events"]] == [10]
        assert moved.json()["nextOffset"] == 11

        unknown = (await poll(http, url, f"{topic}/never", since=0)).json()
        assert unknown["events"] == []
        assert (unknown["nextOffset"], unknown["lastOffset"]) == (0, 0)


async def test_poll_reports_history_it_no_longer_has(
    tmp_path: Path, backend: str, http: httpx.AsyncClient, topic: str
) -> None:
    """With a history of 5, polling from 0 after 250 events says truncated, and
    starts at the oldest offset kept; polling inside the history does not."""
    with running_gateway(tmp_path, history_size=5) as gateway:
        url = gateway.http_url
        response = await publish(http, gateway, [event(topic, n) for n in range(250)])
        assert response.status_code == 200, response.text

        body = (await poll(http, url, topic, since=0, limit=1000)).json()
        first = body["firstOffset"]
        # Redis trims its streams approximately, so it may keep more than 5.
        assert 1 < first <= 246
        assert body["truncated"] is True
        assert [e["offset"] for e in body["events"]] == list(range(first, 251))
        assert body["nextOffset"] == body["lastOffset"] == 250

        inside = (await poll(http, url, topic, since=247)).json()
        assert inside["truncated"] is False
        assert [e["offset"] for e in inside["events"]] == [248, 249, 250]


async def test_bad_polls_get_json_errors(
    tmp_path: Path, backend: str, http: httpx.AsyncClient, topic: str
) -> None:
    """A filter, a bad offset or limit, or an offset beyond the topic's last one
    get a JSON 400 saying what to fix."""
    with running_gateway(tmp_path) as gateway:
        url = gateway.http_url
        await publish(http, gateway, event(topic, 1))
        cases = [
            ("stocks/+", {}, "bad_topic"),
            ("stocks/%23", {}, "bad_topic"),  # "#", escaped in a URL
            ("a//b", {}, "bad_topic"),
            (topic, {"since": -1}, "bad_request"),
            (topic, {"since": "x"}, "bad_request"),
            (topic, {"limit": 0}, "bad_request"),
            (topic, {"limit": 1001}, "bad_request"),
            (topic, {"since": 2}, "offset_ahead"),
        ]
        for name, params, code in cases:
            response = await poll(http, url, name, **params)
            assert response.status_code == 400, (name, params, response.text)
            assert response.json()["error"]["code"] == code, (name, params)
