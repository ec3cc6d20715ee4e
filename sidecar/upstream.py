"""One provider: its pooled clients, the request we build for it, failure mapping.

Chat, completion, embedding and Responses API calls (streamed or not) go through the lean
``h1.H1Pool``; media, uploads and health probes through an aiohttp ``ClientSession``.

The upstream request is built only from the config (URL) and an allow-list of headers plus the
stored key: nothing a client sends can redirect a key or add a header upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Mapping

import aiohttp
from multidict import CIMultiDict

from .config import ProviderConfig, RoutingConfig
from .h1 import DNS_TTL_S, BodyCut, H1Pool, H1Response, InvalidResponse

USER_AGENT = "tokenhub-sidecar/0.1"


class UpstreamError(Exception):
    """An attempt that failed before a usable response: connect error, timeout, reset."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Upstream:
    """A provider's pooled ``ClientSession`` and how to call it."""

    def __init__(
        self,
        provider: ProviderConfig,
        routing: RoutingConfig,
        *,
        connector: aiohttp.BaseConnector | None = None,
    ) -> None:
        self.provider = provider
        self.name = provider.name
        self._routing = routing
        self._base_url = provider.base_url
        headers = CIMultiDict(
            {"User-Agent": USER_AGENT, "Accept": "application/json, text/event-stream"}
        )
        if provider.api_key is not None:
            headers["Authorization"] = f"Bearer {provider.api_key.get_secret_value()}"
        self._answers = H1Pool(
            provider.base_url,
            {**headers, "Accept-Encoding": "gzip, deflate"},
            connect_timeout_s=routing.connect_timeout_s,
            read_timeout_s=routing.first_byte_timeout_s,
        )
        self._session = aiohttp.ClientSession(
            connector=connector
            or aiohttp.TCPConnector(
                limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=int(DNS_TTL_S)
            ),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=routing.connect_timeout_s),
            auto_decompress=True,
            json_serialize=None,  # type: ignore[arg-type]
            raise_for_status=False,
            trust_env=False,
        )

    def url(self, path: str) -> str:
        """``path`` is one of our fixed endpoint paths relative to the provider's base URL."""
        return self._base_url + path

    async def post(self, path: str, body: bytes, *, stream: bool) -> H1Response:
        """POST a JSON body on the lean client (``h1.py``) and return once the head arrived,
        within ``first_byte_timeout_s``. A whole answer's body reads are bounded by it too; a
        stream's caller times the stream itself."""
        try:
            return await self._answers.post(path, "application/json", body, stream=stream)
        except (OSError, InvalidResponse) as exc:  # TimeoutError and BodyCut are OSErrors
            raise self._failure(exc) from None

    async def send(
        self,
        method: str,
        path: str,
        data: bytes | AsyncIterable[bytes] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """A request on aiohttp's client (media, uploads, video jobs), returned once the response
        headers arrived within ``first_byte_timeout_s``; transport failures are mapped. The
        caller bounds the body's reads. A streamed body (multipart uploads) needs its
        ``Content-Length`` in ``headers``, else it goes chunked.
        """
        try:
            async with asyncio.timeout(self._routing.first_byte_timeout_s):
                return await self._session.request(
                    method,
                    self.url(path),
                    data=data,
                    headers=dict(headers or {}),
                    params=dict(params or {}),
                    allow_redirects=False,
                )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc) from None

    async def get(self, path: str) -> aiohttp.ClientResponse:
        try:
            async with asyncio.timeout(self._routing.first_byte_timeout_s):
                return await self._session.get(self.url(path), allow_redirects=False)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise self._failure(exc) from None

    def _failure(self, exc: BaseException) -> UpstreamError:
        """A transport failure before response headers (either client's), as the reason an
        attempt records."""
        if isinstance(exc, TimeoutError):
            timeout_s = self._routing.first_byte_timeout_s
            return UpstreamError(f"no response headers within {timeout_s:g}s")
        if isinstance(exc, aiohttp.ClientConnectorError):
            return UpstreamError(f"connect failed: {exc.os_error.strerror or exc.os_error}")
        if isinstance(exc, aiohttp.ServerDisconnectedError | BodyCut):
            return UpstreamError("connection closed before response headers")
        if isinstance(exc, InvalidResponse):
            return UpstreamError(f"invalid response: {exc}")
        if isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError):
            # The lean client's connect: refused, unresolvable, TLS, or its timeout.
            return UpstreamError(f"connect failed: {exc.strerror or exc}")
        return UpstreamError(f"{type(exc).__name__}: {exc}")

    async def probe(self) -> bool:
        """An active health probe: ``GET {base_url}/models`` answers 2xx."""
        try:
            response = await self.get("/models")
        except UpstreamError:
            return False
        async with response:
            return 200 <= response.status < 300

    async def close(self) -> None:
        self._answers.close()
        await self._session.close()
