"""Fixtures: gateways over real sockets, one per backend, and unique topics."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from support import Gateway, start_gateway

RUN_ID = uuid.uuid4().hex[:8]

#: The state backends every integration test runs against. The Redis backend
#: joins this list when it exists (issue 3).
BACKENDS = ["memory"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Name of the state backend under test."""
    name: str = request.param
    return name


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
