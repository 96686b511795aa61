"""Publish keys with scopes, webhook secrets, and their rotation without a restart."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
from support import (
    API_KEY,
    Gateway,
    assert_no_error_logged,
    event,
    publish,
    read_metrics,
    running_gateway,
    wait_until,
    ws_client,
)
from test_webhooks import deliver, payload, sign

from gateway.errors import Forbidden, Unauthorized
from gateway.security.keys import KeyRing, load_keys_file

STOCKS_KEY = "stocks-feed-key-0001"
NEW_STOCKS_KEY = "stocks-feed-key-0002"
JOBS_KEY = "jobs-and-admin-key-01"
OLD_SECRET = "old-webhook-secret-0123456789"
NEW_SECRET = "new-webhook-secret-9876543210"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_toml(*, stocks_key: str = STOCKS_KEY, secrets: tuple[str, ...] = ()) -> str:
    """A keys file: a stocks-only key by hash, a jobs and admin key in clear."""
    text = f"""
[[publish_keys]]
name = "stocks-feed"
sha256 = "{sha256(stocks_key)}"
topics = ["stocks/#"]

[[publish_keys]]
name = "jobs-runner"
key = "{JOBS_KEY}"
topics = ["reports/+"]
jobs = true
admin = true
"""
    for index, secret in enumerate(secrets):
        text += f'\n[[webhook_secrets]]\nname = "s{index}"\nsecret = "{secret}"\n'
    return text


def write_atomically(path: Path, text: str) -> None:
    """Replace the file whole, as an editor or a secret mount does."""
    scratch = path.with_suffix(".new")
    scratch.write_text(text)
    os.replace(scratch, path)


# The file and the key ring, without a gateway.


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[publish_keys]]\nname = 'a'\ntopics = ['x']", "either sha256 or key"),
        ("[[publish_keys]]\nname = 'a'\nkey = 'short'\ntopics = ['x']", ".key"),
        ("[[publish_keys]]\nname = 'a'\nsha256 = 'AB'\ntopics = ['x']", ".sha256"),
        ("[[publish_keys]]\nname = 'a'\nkey = '12345678'\ntopics = []", ".topics"),
        ("[[publish_keys]]\nname = 'a'\nkey = '12345678'\ntopics = ['a/#/b']", "'#'"),
        ("[[publish_keys]]\nname = 'a b'\nkey = '12345678'\ntopics = ['x']", ".name"),
        ("[[publish_keys]]\nname='a'\nkey='12345678'\ntopics=['x']\nadmin=1", "admin"),
        ("[[publish_keys]]\nname='a'\nkey='12345678'\ntopics=['x']\nwho=1", "'who'"),
        ("[[webhook_secrets]]\nname = 'a'\nsecret = 'short'", ".secret"),
        ("[[publish_key]]\nname = 'a'", "unknown table 'publish_key'"),
        ("publish_keys = 3", "array of tables"),
        ("[[publish_keys]\n", "not TOML"),
    ],
)
def test_a_malformed_keys_file_is_refused_naming_the_field(
    tmp_path: Path, text: str, words: str
) -> None:
    """Each kind of mistake in a keys file is refused with a message naming it."""
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ValueError) as raised:
        load_keys_file(path)
    assert words in str(raised.value)


def test_two_keys_of_one_name_are_refused(tmp_path: Path) -> None:
    """Names identify keys in logs, so they must be unique."""
    path = tmp_path / "keys.toml"
    entry = "[[publish_keys]]\nname = 'a'\nkey = '{}'\ntopics = ['x']\n"
    path.write_text(entry.format("12345678") + entry.format("87654321"))
    with pytest.raises(ValueError, match="two publish keys are named 'a'"):
        load_keys_file(path)


def test_scopes_of_each_key(tmp_path: Path) -> None:
    """The operator may do all; a scoped key only its topics, jobs and admin."""
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml())
    ring = KeyRing(API_KEY, keys_file=str(path))
    operator = ring.authenticate(f"Bearer {API_KEY}")
    operator.check_publish(["jobs/x", "stocks/AAPL", "a/b/c"])
    operator.check_jobs()
    operator.check_admin()

    stocks = ring.authenticate(f"bearer {STOCKS_KEY}")
    stocks.check_publish(["stocks/AAPL", "stocks"])
    with pytest.raises(Forbidden, match="'teams/ARG'"):
        stocks.check_publish(["stocks/AAPL", "teams/ARG"])
    with pytest.raises(Forbidden):
        stocks.check_jobs()
    with pytest.raises(Forbidden):
        stocks.check_admin()

    runner = ring.authenticate(f"Bearer {JOBS_KEY}")
    runner.check_jobs()
    runner.check_admin()
    with pytest.raises(Forbidden):
        runner.check_publish(["reports/a/b"])

    for header in (None, "", "Bearer", "Basic abc", f"Bearer {STOCKS_KEY}x"):
        with pytest.raises(Unauthorized):
            ring.authenticate(header)


def test_the_jobs_tree_takes_the_jobs_right_to_publish(tmp_path: Path) -> None:
    """A key scoped to every topic still cannot forge a job's events."""
    path = tmp_path / "keys.toml"
    path.write_text(
        '[[publish_keys]]\nname = "all"\nkey = "all-topics-1"\ntopics = ["#"]\n'
        '[[publish_keys]]\nname = "all-jobs"\nkey = "all-topics-2"\n'
        'topics = ["#"]\njobs = true\n'
    )
    ring = KeyRing(API_KEY, keys_file=str(path))
    everything = ring.authenticate("Bearer all-topics-1")
    everything.check_publish(["stocks/AAPL", "jobsx/1", "teams/jobs"])
    for topic in ("jobs/0123abcd", "jobs"):
        with pytest.raises(Forbidden, match="jobs right"):
            everything.check_publish(["stocks/AAPL", topic])
    ring.authenticate("Bearer all-topics-2").check_publish(["jobs/0123abcd"])


def test_a_changed_file_replaces_the_keys_and_a_broken_one_keeps_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rotation: the new file's keys replace the old ones; a broken or missing
    file leaves the keys in force and says why."""
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(secrets=(OLD_SECRET,)))
    ring = KeyRing(API_KEY, webhook_secret=NEW_SECRET, keys_file=str(path))
    assert ring.webhook_secrets == (NEW_SECRET.encode(), OLD_SECRET.encode())
    assert not ring.reload_if_changed()

    write_atomically(path, keys_toml(stocks_key=NEW_STOCKS_KEY))
    assert ring.reload_if_changed()
    ring.authenticate(f"Bearer {NEW_STOCKS_KEY}")
    with pytest.raises(Unauthorized):
        ring.authenticate(f"Bearer {STOCKS_KEY}")
    assert ring.webhook_secrets == (NEW_SECRET.encode(),)

    write_atomically(path, "[[publish_keys]\n")
    assert not ring.reload_if_changed()
    path.unlink()
    assert not ring.reload_if_changed()
    ring.authenticate(f"Bearer {NEW_STOCKS_KEY}")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert "not TOML" in warnings[0] and "cannot read" in warnings[1]


def test_every_key_is_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup compares the key with every known key through compare_digest,
    also after a match, so its time does not tell which key matched."""
    from gateway.security import keys

    calls = []
    real = keys.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", spy)
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml())
    ring = KeyRing(API_KEY, keys_file=str(path))
    ring.authenticate(f"Bearer {API_KEY}")
    assert len(calls) == 3
    with pytest.raises(Unauthorized):
        ring.authenticate("Bearer nobody-has-this-key")
    assert len(calls) == 6


# Against a running gateway.


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(secrets=(OLD_SECRET,)))
    return path


async def test_scoped_keys_over_http(
    tmp_path: Path, backend: str, keys_file: Path, http: httpx.AsyncClient
) -> None:
    """A stocks key publishes on stocks and nowhere else (a mixed batch is refused
    whole, 403 naming the topic); jobs and admin need their rights."""
    topic = f"stocks/T{uuid.uuid4().hex[:8]}"
    with running_gateway(tmp_path, keys_file=keys_file) as gateway:
        async with ws_client(gateway) as client:
            await client.subscribe("stocks/#", "teams/#")
            allowed = await publish(http, gateway, event(topic, 1), key=STOCKS_KEY)
            mixed = await publish(
                http,
                gateway,
                [event(topic, 2), event("teams/ARG", 3)],
                key=STOCKS_KEY,
            )
            after = await publish(http, gateway, event(topic, 4), key=STOCKS_KEY)
            received = await client.events(2)
        job_body = {"kind": "db-refresh", "params": {"step_seconds": 0.01}}
        url = gateway.http_url
        stocks_job = await http.post(
            f"{url}/jobs", json=job_body, headers=_bearer(STOCKS_KEY)
        )
        runner_job = await http.post(
            f"{url}/jobs", json=job_body, headers=_bearer(JOBS_KEY)
        )
        stocks_admin = await http.get(f"{url}/admin/stats", headers=_bearer(STOCKS_KEY))
        runner_admin = await http.get(f"{url}/admin/stats", headers=_bearer(JOBS_KEY))
        runner_publish = await publish(http, gateway, event(topic, 5), key=JOBS_KEY)
        metrics = await read_metrics(http, gateway)
        assert_no_error_logged(gateway)
    assert allowed.status_code == 200, allowed.text
    assert mixed.status_code == 403
    assert mixed.json()["error"]["code"] == "forbidden"
    assert "'teams/ARG'" in mixed.json()["error"]["message"]
    # Nothing of the refused batch was stored: the next event takes offset 2.
    assert after.json()["events"][0]["offset"] == 2
    assert [(m["topic"], m["offset"], m["eventDetails"]["n"]) for m in received] == [
        (topic, 1, 1),
        (topic, 2, 4),
    ]
    assert (stocks_job.status_code, stocks_job.json()["error"]["code"]) == (
        403,
        "forbidden",
    )
    assert runner_job.status_code == 202, runner_job.text
    assert stocks_admin.status_code == 403
    assert runner_admin.status_code == 200
    assert runner_publish.status_code == 403
    assert metrics["gateway_publish_keys"] == 2
    assert metrics['gateway_client_errors_total{code="forbidden"}'] == 3


async def test_publish_key_rotation_without_restart(
    tmp_path: Path, keys_file: Path, http: httpx.AsyncClient
) -> None:
    """A new key added to the file works within seconds while the old one still
    does; once the old one is removed it gets 401; a broken file changes nothing."""
    topic = f"stocks/R{uuid.uuid4().hex[:8]}"
    with running_gateway(tmp_path, keys_file=keys_file) as gateway:
        both = keys_toml() + keys_toml(stocks_key=NEW_STOCKS_KEY).replace(
            'name = "', 'name = "new-'
        )
        write_atomically(keys_file, both)
        await _until_status(http, gateway, topic, NEW_STOCKS_KEY, 200)
        old_during = await publish(http, gateway, event(topic), key=STOCKS_KEY)

        write_atomically(keys_file, keys_toml(stocks_key=NEW_STOCKS_KEY))
        await _until_status(http, gateway, topic, STOCKS_KEY, 401)
        new_after = await publish(http, gateway, event(topic), key=NEW_STOCKS_KEY)

        write_atomically(keys_file, "not toml at all [")
        await wait_until(
            lambda: _logged(gateway, "keys file not usable"), what="the warning"
        )
        still = await publish(http, gateway, event(topic), key=NEW_STOCKS_KEY)
        operator = await publish(http, gateway, event("teams/ARG"), key=API_KEY)
        assert_no_error_logged(gateway)
    assert old_during.status_code == 200
    assert new_after.status_code == 200
    assert still.status_code == 200
    assert operator.status_code == 200


async def test_webhook_secret_rotation_without_restart(
    tmp_path: Path, keys_file: Path, http: httpx.AsyncClient
) -> None:
    """While the keys file lists two webhook secrets both sign valid deliveries,
    beside --webhook-secret; a secret removed from the file gets 401."""
    given = "given-webhook-secret-000000"
    with running_gateway(
        tmp_path, keys_file=keys_file, webhook_secret=given
    ) as gateway:
        write_atomically(keys_file, keys_toml(secrets=(OLD_SECRET, NEW_SECRET)))
        first = orjson.dumps(payload())
        await wait_until(
            lambda: _accepted(http, gateway, first, NEW_SECRET),
            what="the new secret taken",
        )
        answers = {}
        for secret in (OLD_SECRET, given):
            body = orjson.dumps(payload())
            answers[secret] = await deliver(
                http, gateway, body, sign(body, secret=secret)
            )

        write_atomically(keys_file, keys_toml(secrets=(NEW_SECRET,)))
        old = orjson.dumps(payload())
        await wait_until(
            lambda: _refused(http, gateway, old, OLD_SECRET),
            what="the old secret refused",
        )
        body = orjson.dumps(payload())
        new = await deliver(http, gateway, body, sign(body, secret=NEW_SECRET))
    assert {secret: a.status_code for secret, a in answers.items()} == {
        OLD_SECRET: 200,
        given: 200,
    }
    assert new.status_code == 200


async def test_webhook_secrets_from_the_file_alone_turn_the_webhook_on(
    tmp_path: Path, keys_file: Path, http: httpx.AsyncClient
) -> None:
    """Without --webhook-secret, a secret in the keys file is enough."""
    with running_gateway(tmp_path, keys_file=keys_file) as gateway:
        body = orjson.dumps(payload())
        answer = await deliver(http, gateway, body, sign(body, secret=OLD_SECRET))
    assert answer.status_code == 200, answer.text


def test_a_bad_keys_file_stops_the_gateway_naming_the_setting(tmp_path: Path) -> None:
    """At start, an invalid or missing keys file is a usage error naming the flag."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[[publish_keys]]\nname = 'a'\nkey = 'short'\ntopics = ['x']\n")
    for path in (bad, tmp_path / "missing.toml"):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--keys-file", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "GATEWAY_MQTT_BROKER": "none"},
        )
        assert result.returncode == 2, result.stderr
        assert "--keys-file / GATEWAY_KEYS_FILE" in result.stderr, result.stderr


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _until_status(
    http: httpx.AsyncClient, gateway: Gateway, topic: str, key: str, status: int
) -> None:
    async def answered() -> bool:
        response = await publish(http, gateway, event(topic), key=key)
        return response.status_code == status

    await wait_until(answered, what=f"a publish answered {status}")


async def _logged(gateway: Gateway, words: str) -> bool:
    return words in gateway.log()


async def _accepted(
    http: httpx.AsyncClient, gateway: Gateway, body: bytes, secret: str
) -> bool:
    response = await deliver(http, gateway, body, sign(body, secret=secret))
    return response.status_code == 200


async def _refused(
    http: httpx.AsyncClient, gateway: Gateway, body: bytes, secret: str
) -> bool:
    response = await deliver(http, gateway, body, sign(body, secret=secret))
    return response.status_code == 401
