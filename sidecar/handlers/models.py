"""``GET /v1/models`` and ``GET /v1/models/{id}``: what is in scope, in OpenAI's list shape."""

from __future__ import annotations

import orjson
from aiohttp import web

from ..errors import ModelNotFound
from ..state import LIVE


async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[LIVE].current.catalog
    return web.json_response({"object": "list", "data": catalog.listing()}, dumps=_dumps)


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    entry = request.app[LIVE].current.catalog.model_entry(model_id)
    if entry is None:
        raise ModelNotFound(
            f"No model {model_id!r} is in scope; GET /v1/models lists the models you can use.",
            param="model",
        )
    return web.json_response(entry, dumps=_dumps)


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()
