"""``GET /v1/models`` and ``GET /v1/models/{id}``: what is in scope, in OpenAI's list shape,
whichever server front read the request."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..errors import ModelNotFound
from ..state import LIVE, Runtime
from .context import Incoming, Outlet, WholeResponse

LIST = "/v1/models"
ONE = "/v1/models/{model_id}"
_JSON = "application/json; charset=utf-8"


async def list_models(request: web.Request) -> web.Response:
    return _aiohttp(_listing(request.app[LIVE].current))


async def get_model(request: web.Request) -> web.Response:
    return _aiohttp(_entry(request.app[LIVE].current, request.match_info["model_id"]))


async def serve_list(incoming: Incoming, outlet: Outlet) -> WholeResponse:
    """``GET /v1/models`` on the lean front."""
    return _whole(_listing(incoming.runtime))


async def serve_one(incoming: Incoming, outlet: Outlet, *, model_id: str) -> WholeResponse:
    """``GET /v1/models/{id}`` on the lean front."""
    return _whole(_entry(incoming.runtime, model_id))


def _listing(runtime: Runtime) -> dict[str, Any]:
    return {"object": "list", "data": runtime.catalog.listing()}


def _entry(runtime: Runtime, model_id: str) -> dict[str, Any]:
    entry = runtime.catalog.model_entry(model_id)
    if entry is None:
        raise ModelNotFound(
            f"No model {model_id!r} is in scope; GET /v1/models lists the models you can use.",
            param="model",
        )
    return entry


def _aiohttp(document: dict[str, Any]) -> web.Response:
    return web.json_response(document, dumps=_dumps)


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()


def _whole(document: dict[str, Any]) -> WholeResponse:
    return WholeResponse(200, {}, orjson.dumps(document), _JSON)
