"""The OpenAPI document of the HTTP API, served at ``GET /openapi.json``.

The document is written by hand in ``openapi.yaml`` beside this module, from what
the handlers do; ``tests/test_openapi.py`` checks that it names every route of the
app and fuzzes a running gateway against it.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import orjson
import yaml
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["document", "routes"]


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document, read from the package once per process.

    Every call returns the same mapping, which callers must not change.

    Raises:
        ValueError: the packaged file is not a YAML mapping; a broken build.
    """
    resource = resources.files("gateway.ingress").joinpath("openapi.yaml")
    loaded = yaml.safe_load(resource.read_text("utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError("openapi.yaml does not hold a mapping")
    return loaded


@functools.cache
def _encoded() -> bytes:
    # Encoded once too: the document never changes while the process runs.
    return orjson.dumps(document())


async def openapi(request: Request) -> Response:
    """GET /openapi.json: the OpenAPI 3.1 document of the gateway's HTTP API."""
    return Response(_encoded(), media_type="application/json")


routes = [Route("/openapi.json", openapi, methods=["GET"])]
