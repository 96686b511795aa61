"""Schemathesis hooks of the long fuzzing run: signed webhooks, documented rules.

``tests/schemathesis.toml`` loads this file. A generated delivery to
``POST /webhooks/fixtures`` that carries both signature headers gets a fresh
timestamp and the signature of its body's bytes under ``GATEWAY_WEBHOOK_SECRET``, so
that the payload checks behind the signature are fuzzed too; one that lacks a header
still tests the refusal.

Schemathesis' ``positive_data_acceptance`` check wants every request its schema
allows to be accepted. A few refusals follow rules that no JSON Schema can state,
each written in the document's descriptions; ``documented_acceptance`` is that check
with those refusals let through, and the configuration runs it instead.
"""

from __future__ import annotations

import os
import time
from typing import Any

import schemathesis
from requests.compat import json as requests_json
from schemathesis.core import NotSet
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gateway.ingress.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature

WEBHOOK_PATH = "/webhooks/fixtures"

#: Refusals of requests the schema allows, by rules it cannot state: the
#: operation, the error code and a part of the message.
DOCUMENTED_REFUSALS = (
    # A since beyond the topic's last offset: the history was reset.
    ("GET /topics/{topic}/events", "offset_ahead", ""),
    # db-refresh steps that take over 1,800 s in all.
    ("POST /jobs", "bad_params", "the steps take over"),
    # Whole numbers written with a fraction (5.0), which JSON Schema calls integers.
    ("POST /jobs", "bad_params", "ticks: expected an integer"),
    ("POST /webhooks/fixtures", "bad_request", "minute: expected a whole number"),
    # A fixture whose home and away teams are the same.
    ("POST /webhooks/fixtures", "bad_request", "fixture.away: a team cannot play"),
    # An event source with characters Python does not call printable (control
    # characters, unassigned code points), which JSON Schema cannot name.
    ("POST /events", "bad_request", ".eventSource: expected a string of 1 to 128"),
    # Generated cases share Idempotency-Key values across different bodies (422).
    ("POST /events", "idempotency_key_reused", ""),
)


def body_bytes(body: object) -> bytes:
    """The bytes requests sends for a generated JSON body, as schemathesis passes it."""
    if isinstance(body, NotSet):
        return b""
    if isinstance(body, bytes):
        return body
    if body is None:
        return b"null"
    # The very function requests encodes ``json=`` with, so the bytes agree.
    encoded = requests_json.dumps(body, allow_nan=False)
    return encoded if isinstance(encoded, bytes) else encoded.encode()


def sign(headers: dict[str, Any], body: object, secret: bytes) -> None:
    """Replace the generated signature headers with a valid pair for ``body``."""
    timestamp = str(int(time.time()))
    headers[TIMESTAMP_HEADER] = timestamp
    digest = signature(secret, timestamp, body_bytes(body))
    headers[SIGNATURE_HEADER] = f"sha256={digest}"


def before_call(
    context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]
) -> None:
    """Sign a webhook delivery that carries both signature headers."""
    secret = os.environ.get("GATEWAY_WEBHOOK_SECRET")
    if case.operation.path != WEBHOOK_PATH or not secret or case.headers is None:
        return
    if TIMESTAMP_HEADER in case.headers and SIGNATURE_HEADER in case.headers:
        sign(case.headers, case.body, secret.encode())


def documented_refusal(label: str, response: schemathesis.Response) -> bool:
    """Tell whether a 400 or 422 answer follows one of ``DOCUMENTED_REFUSALS``."""
    if response.status_code not in (400, 422):
        return False
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        return False
    return any(
        label == rule_label and code == rule_code and part in message
        for rule_label, rule_code, part in DOCUMENTED_REFUSALS
    )


def documented_acceptance(
    ctx: schemathesis.CheckContext,
    response: schemathesis.Response,
    case: schemathesis.Case,
) -> bool | None:
    """``positive_data_acceptance``, except for the documented refusals."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if documented_refusal(case.operation.label, response):
            return None
        raise


# tests/test_openapi.py imports this module for ``sign``; only schemathesis' loader
# of hooks files, which names the module otherwise, registers the hook.
if __name__ != "schemathesis_hooks":
    schemathesis.hook(before_call)
    schemathesis.check(documented_acceptance)
