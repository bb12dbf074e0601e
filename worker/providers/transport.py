"""The transport under the provider clients' ``httpx.AsyncClient``: httpx on an aiohttp pool.

httpx's default transport (httpcore) spends CPU that grows with the requests in flight: its pool
matches every waiting request against every connection on each change.  At 256 in flight
(``ops/bench/http_transports.py``) it cost 5.2–5.9 ms of CPU per request, against 0.27–0.30 ms
for JsonHttp on this transport.
``httpx_aiohttp.AiohttpTransport`` runs httpx's requests on an aiohttp connection pool instead.
:class:`AiohttpTransport` keeps its constructor and ``aclose`` and replaces the request path:

* the pool is a ``TCPConnector`` sized by the ``httpx.Limits`` (total and per host), with the
  keep-alive expiry and the SSL context given, DNS answers cached 5 minutes, and no cookie jar
  of its own (httpx keeps the cookies, as with any of its transports);
* header names go out as the caller spelled them (httpx's ``Headers`` items are lower-cased);
* the URL reaches aiohttp as it was encoded: given a ``str``, aiohttp re-quotes it and turns
  ``%3B``, ``%40``, ``%21``... (reserved characters an id may hold) back into ``;``, ``@``, ``!``,
  which a server may read differently;
* aiohttp's errors become the httpx error that says what happened: the stock mapping makes a
  refused connection and a server disconnect a ``ConnectTimeout`` and lets
  ``ClientResponseError`` (a malformed answer) through untranslated;
* the whole body is read before the response is returned (the clients always read it), so the
  connection goes back to the pool at once and a broken body fails here, translated.

Requests must carry their body in memory (``content=``), as :class:`~worker.providers.http.JsonHttp`
sends them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import httpx
import httpx_aiohttp
from yarl import URL

DNS_CACHE_S = 300

# aiohttp's error → the httpx error; the first that matches wins, so subclasses come first.
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientError, httpx.TransportError),
    (ValueError, httpx.LocalProtocolError),  # aiohttp refused to send it (e.g. CR/LF in a header)
)


@contextmanager
def _translated() -> Iterator[None]:
    """aiohttp's errors raised as the matching httpx error (the original as its cause)."""
    try:
        yield
    except Exception as exc:
        for source, target in _ERRORS:
            if isinstance(exc, source):
                raise target(type(exc).__name__) from exc
        raise


class AiohttpTransport(httpx_aiohttp.AiohttpTransport):
    """httpx requests on one aiohttp pool: encoded URLs kept, errors translated, bodies read."""

    def get_client(self) -> aiohttp.ClientSession:
        """The pool: ``limits`` connections (per host too), their keep-alive, the SSL context."""
        limit = self.limits.max_connections or 0  # 0: no limit, as httpx's None
        connector = aiohttp.TCPConnector(
            limit=limit,
            limit_per_host=limit,
            keepalive_timeout=self.limits.keepalive_expiry,
            ttl_dns_cache=DNS_CACHE_S,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on the pool; the answer with its body read, or an httpx error."""
        session = self.client
        if not isinstance(session, aiohttp.ClientSession):
            session = self.client = self.get_client()
        timeout = request.extensions.get("timeout", {})
        with _translated():
            async with session.request(
                request.method,
                URL(str(request.url), encoded=True),
                headers=[
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                ],
                data=request.content or None,
                allow_redirects=False,
                auto_decompress=False,  # httpx decodes, as the Content-Encoding says
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                    connect=timeout.get("pool"),
                ),
                server_hostname=request.extensions.get("sni_hostname"),
            ) as response:
                content = await response.read()
        return httpx.Response(
            response.status,
            headers=response.raw_headers,
            content=content,
            request=request,
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )
