"""The OpenAPI document: it names every route, is valid, and the gateway keeps to it.

The fuzzing here is short, with a fixed seed, so that it suits CI: a few dozen cases
per operation and backend, each answer checked against the document (no 5xx, a
documented status code, content type, headers and body). The long run, with every
schemathesis check and its stateful phase, is a command: README, "Fuzzing".
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from conftest import BACKENDS, backend_environment
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis_hooks import WEBHOOK_PATH, sign
from starlette.routing import Mount, Route
from support import API_KEY, Gateway, start_gateway

from gateway.app import create_app
from gateway.config import Settings
from gateway.errors import BadTopic
from gateway.events.topics import validate_topic
from gateway.ingress.openapi import document
from gateway.runtime import Runtime
from gateway.state.memory import MemoryBackend

DOCUMENT = document()
# A copy: schemathesis may write what it infers into the document it is given.
SCHEMA = schemathesis.openapi.from_dict(copy.deepcopy(DOCUMENT))
WEBHOOK_SECRET = "openapi-test-webhook-secret"
#: Cases per operation and backend.
EXAMPLES = 40
#: What each case's answer is checked for.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
#: Operations not fuzzed, and why.
NOT_FUZZED = {
    "GET /ws": "a plain HTTP client can only get the 426 that "
    "test_plain_get_of_ws_is_documented checks; the WebSocket protocol has tests of "
    "its own (test_protocol.py)",
}
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _operations() -> dict[str, schemathesis.APIOperation]:
    operations = {}
    for result in SCHEMA.get_all_operations():
        operation = result.ok()
        operations[operation.label] = operation
    return operations


OPERATIONS = _operations()


def _app_routes() -> set[tuple[str, str]]:
    """Method and path of every route of the app, in the document's spelling."""
    app = create_app(Runtime(Settings(api_key=API_KEY), MemoryBackend()))
    found = set()
    for route in app.routes:
        if isinstance(route, Route):
            # Starlette answers HEAD on every GET route; the document says so once.
            methods = (route.methods or set()) - {"HEAD"}
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
            found |= {(method, path) for method in methods}
        elif isinstance(route, Mount):
            # The static files: GET (and HEAD) of any path under the mount.
            found.add(("GET", f"{route.path}/{{path}}"))
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return found


def test_every_route_is_documented_and_every_operation_exists() -> None:
    """The document lists exactly the app's routes, method by method."""
    documented = {
        (method.upper(), path)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in _METHODS
    }
    assert documented == _app_routes()


def test_document_has_the_package_version() -> None:
    """The document's version is the gateway's."""
    assert DOCUMENT["info"]["version"] == version("notification-gateway")


def test_document_is_valid_openapi() -> None:
    """The document passes the OpenAPI 3.1 schema, each of its schemas is a valid
    JSON Schema, every reference resolves and every link names an operation."""
    SCHEMA.validate()
    assert DOCUMENT["openapi"] == "3.1.0"
    schemas = list(_walk(DOCUMENT, "schema")) + list(
        DOCUMENT["components"]["schemas"].values()
    )
    for schema in schemas:
        jsonschema_rs.meta.validate(schema)
    for reference in _walk(DOCUMENT, "$ref"):
        assert _resolve(reference) is not None, reference
    operation_ids = [
        item[method]["operationId"]
        for item in DOCUMENT["paths"].values()
        for method in item
        if method in _METHODS
    ]
    assert len(operation_ids) == len(set(operation_ids))
    for links in _walk(DOCUMENT, "links"):
        for link in links.values():
            assert link["operationId"] in operation_ids, link


def _walk(node: Any, key: str) -> Iterator[Any]:
    """Every value under ``key`` anywhere in ``node``, examples left out."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            elif name not in ("example", "examples"):
                yield from _walk(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value, key)


def _resolve(reference: str) -> Any:
    assert reference.startswith("#/"), reference
    node: Any = DOCUMENT
    for part in reference[2:].split("/"):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# The document's grammar of topics against the gateway's.

_TOPIC = jsonschema_rs.validator_for(DOCUMENT["components"]["schemas"]["Topic"])
_TOPIC_PATTERN = DOCUMENT["components"]["schemas"]["Topic"]["pattern"]
_PROPERTY = settings(max_examples=300, derandomize=True, database=None, deadline=None)
#: Levels at the edges of the grammar: only dots, 64 and 65 characters.
_LEVELS = st.sampled_from(["a", ".", "..", "x.", "-", "a" * 64, "b" * 65])


def _gateway_takes_topic(name: str) -> bool:
    try:
        validate_topic(name)
    except BadTopic:
        return False
    return True


@_PROPERTY
@given(
    name=st.one_of(
        st.from_regex(_TOPIC_PATTERN, fullmatch=True),
        st.text(alphabet="aZ09_-.:@=/ +#é\n", max_size=300),
        st.lists(_LEVELS).map("/".join),
    )
)
def test_topic_schema_is_the_gateway_grammar(name: str) -> None:
    """A topic matches the document's Topic schema exactly when the gateway takes
    it (with the default length and depth limits)."""
    assert _TOPIC.is_valid(name) == _gateway_takes_topic(name), name


# Fuzzing a gateway over real sockets.


@pytest.fixture(scope="module", params=BACKENDS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A gateway with webhooks and demo jobs on, so that every route does work."""
    tmp_path: Path = tmp_path_factory.mktemp(f"openapi-{request.param}")
    with backend_environment(request.param):
        gateway = start_gateway(
            tmp_path, webhook_secret=WEBHOOK_SECRET, demo_page_jobs="true"
        )
        try:
            yield gateway
        finally:
            gateway.stop()


def _needs_api_key(operation: schemathesis.APIOperation) -> bool:
    security = operation.definition.raw.get("security", [])
    return any("apiKey" in requirement for requirement in security)


def _strategy(operation: schemathesis.APIOperation) -> st.SearchStrategy[Any]:
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )


@pytest.mark.parametrize(
    "label", [label for label in OPERATIONS if label not in NOT_FUZZED]
)
def test_gateway_keeps_to_its_document(served: Gateway, label: str) -> None:
    """Generated requests, valid and not, get answers the document describes and
    never a 5xx."""
    operation = OPERATIONS[label]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if not _needs_api_key(operation):
        headers = {}

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )
    @given(case=_strategy(operation))
    def check(case: schemathesis.Case) -> None:
        if case.path == WEBHOOK_PATH and case.headers is not None:
            sign(case.headers, case.body, WEBHOOK_SECRET.encode())
        case.call_and_validate(
            base_url=served.http_url, headers=headers, checks=CHECKS, timeout=35
        )

    check()
    assert "Traceback" not in served.log()


def test_gateway_serves_its_document(served: Gateway) -> None:
    """GET /openapi.json is the packaged document, as JSON."""
    response = httpx.get(f"{served.http_url}/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == DOCUMENT


def test_plain_get_of_ws_is_documented(served: Gateway) -> None:
    """A plain GET of /ws gets the documented 426."""
    response = httpx.get(f"{served.http_url}/ws")
    assert response.status_code == 426
    OPERATIONS["GET /ws"].validate_response(response)


# Bugs found while writing the document (polling) and by the long run (Allow).


@pytest.mark.parametrize(
    "query",
    [
        {"since": "\N{SUPERSCRIPT TWO}"},
        {"limit": "\N{ARABIC-INDIC DIGIT ONE}"},
        {"since": "1" * 5000},
        {"limit": "0" * 40 + "5"},
    ],
    ids=["superscript", "arabic-indic", "5000-digits", "41-digits"],
)
def test_poll_refuses_digits_int_cannot_read(
    served: Gateway, query: dict[str, str]
) -> None:
    """since and limit made of digits that int() refuses, or too many of them, get
    400 bad_request, not a crash."""
    response = httpx.get(f"{served.http_url}/topics/a/events", params=query)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_request"
    assert "Traceback" not in served.log()


@pytest.mark.parametrize("method", ["PUT", "PATCH", "OPTIONS"])
def test_405_of_a_job_lists_get_and_delete(served: Gateway, method: str) -> None:
    """A method a job does not support gets 405 with an Allow header naming every
    method it does: GET, HEAD and DELETE."""
    url = f"{served.http_url}/jobs/{'x' * 32}"
    response = httpx.request(method, url)
    assert response.status_code == 405
    allowed = {name.strip() for name in response.headers["allow"].split(",")}
    assert allowed == {"GET", "HEAD", "DELETE"}
    assert httpx.get(url).status_code == 404
    key = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.delete(url, headers=key).status_code == 404
