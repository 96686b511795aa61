"""Fixtures: gateways over real sockets, one per backend, and unique topics."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from support import Gateway, start_gateway

RUN_ID = uuid.uuid4().hex[:8]

#: The state backends every integration test runs against.
BACKENDS = ["memory", "redis"]
#: The Redis the shared-Redis tests use; each test gets a key prefix of its own.
REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The state backend under test, passed to gateways through the environment.

    For Redis, every gateway the test starts shares ``REDIS_URL`` under a key
    prefix unique to the test, and the test's keys are deleted afterwards.
    """
    name: str = request.param
    if name == "memory":
        monkeypatch.delenv("GATEWAY_REDIS_URL", raising=False)
        yield name
        return
    with _redis_for_test(monkeypatch):
        yield name


@pytest.fixture
def shared_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Gateways started by the test share the machine's Redis; yields the prefix."""
    with _redis_for_test(monkeypatch) as prefix:
        yield prefix


@contextlib.contextmanager
def _redis_for_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    prefix = f"test:{RUN_ID}:{uuid.uuid4().hex[:8]}:"
    monkeypatch.setenv("GATEWAY_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("GATEWAY_REDIS_PREFIX", prefix)
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@contextlib.contextmanager
def backend_environment(backend: str) -> Iterator[None]:
    """The environment of gateways started inside, for one backend.

    For fixtures wider than one test, which cannot take ``backend``: with Redis,
    keys go under a prefix of their own, deleted afterwards.
    """
    with pytest.MonkeyPatch.context() as patch:
        if backend == "memory":
            patch.delenv("GATEWAY_REDIS_URL", raising=False)
            yield
        else:
            with _redis_for_test(patch):
                yield


@pytest.fixture
def gateway(tmp_path: Path, backend: str) -> Iterator[Gateway]:
    """A gateway with default settings on a free port."""
    process = start_gateway(tmp_path)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def topic(request: pytest.FixtureRequest) -> str:
    """A topic no other test (or test run) uses: ``tests/<run>/<test name>``."""
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", request.node.name)[:60]
    return f"tests/{RUN_ID}/{name}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the publish and admin APIs."""
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def pytest_report_header() -> str:
    factor = os.environ.get("GATEWAY_TEST_TIMEOUT_FACTOR", "1")
    return f"gateway tests: run {RUN_ID}, timeout factor {factor}"
