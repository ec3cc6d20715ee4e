"""The floor of our stack: a bare aiohttp + uvloop + orjson proxy (parse, swap model, forward).

python bench/floor.py --port 8701 --upstream http://127.0.0.1:8702 --model bench-model-upstream
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import orjson
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
MODEL = web.AppKey("model", str)


async def proxy(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    body["model"] = request.app[MODEL]
    url = request.app[UPSTREAM] + request.path
    headers = {"Content-Type": "application/json"}
    async with request.app[SESSION].post(url, data=orjson.dumps(body), headers=headers) as up:
        if not body.get("stream"):
            return web.Response(body=await up.read(), status=up.status, headers=headers)
        out = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        async for chunk in up.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        app[SESSION] = session
        yield


def create_app(upstream: str, upstream_model: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM], app[MODEL] = upstream.rstrip("/"), upstream_model
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/-/health", health)
    app.router.add_post("/v1/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="bare aiohttp proxy: the floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT (no /v1)")
    parser.add_argument("--model", default="bench-model-upstream", help="model name to send")
    args = parser.parse_args()
    app = create_app(args.upstream, args.model)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        backlog=4096,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
