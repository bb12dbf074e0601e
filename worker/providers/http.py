"""The HTTP boundary shared by the provider clients.

One :class:`JsonHttp` per client owns one long-lived ``httpx.AsyncClient`` (one connection pool of
``pool_size``, keep-alive 30 s, ``timeout_s`` per phase and for the whole request, no redirects,
TLS verified against the system's CAs, no proxy or certificate settings taken from the
environment).  Its transport is :class:`~worker.providers.transport.AiohttpTransport` (httpx on
an aiohttp pool, the faster of the two measured), or httpx's own (``backend="httpcore"``), or one
a test hands in (``transport=``, e.g. ``httpx.MockTransport``).  It sends one JSON request (orjson,
``content=``) and hands back the answer, or raises :class:`~worker.errors.ProviderUnavailable`
for everything that is not an answer: a timeout (``timed out after …s``), any other httpx
transport error (its class name), a body that cannot be decoded, a 2xx that is not JSON.  httpx's
errors are translated here and nowhere else.  :func:`classify` turns an HTTP status into the
contract's error code, :func:`provider_error` into the matching exception, and
:func:`retry_after` reads how long the provider asked us to wait.

httpx 0.28 ties every answer into a reference cycle (``response.stream``, a ``BoundAsyncStream``,
points back at the response: encode/httpx#3733), which left ~34 objects per request to the cycle
collector: a generation-0 pass of 3–7 ms about once a second at 320 requests/s, and a longer one
now and then, inside the worker's latency.  Once the body is read the stream is spent, so
:meth:`JsonHttp.request` swaps it for an empty one and the answer is freed as soon as it is
dropped.

Nothing here puts a secret into a message: URLs carry no credentials, headers are never echoed,
and :func:`redact` scrubs what a provider echoes back.
"""

from __future__ import annotations

import asyncio
import math
import re
import ssl
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx
import orjson

from worker.errors import (
    InvalidMessage,
    ProviderAnswer,
    ProviderName,
    ProviderRejected,
    ProviderUnavailable,
    WorkerError,
)
from worker.providers.transport import AiohttpTransport
from worker.settings import ProviderConfig

ProviderErrorCode = Literal[
    "provider_rejected",
    "provider_not_found",
    "provider_unauthorized",
    "provider_unavailable",
    "rate_limited",
]
Backend = Literal["aiohttp", "httpcore"]
TRANSIENT_CODES: frozenset[str] = frozenset({"provider_unavailable", "rate_limited"})
DEFAULT_BACKEND: Backend = "aiohttp"
KEEPALIVE_S = 30.0
_SPENT = httpx.ByteStream(b"")  # what a read answer's stream is swapped for (see the docstring)
MAX_MESSAGE_CHARS = 500
REDACTED = "[REDACTED]"

_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_DELTA_SECONDS = re.compile(r"^\s*-?\d+(\.\d+)?\s*$")


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """One HTTP answer: status, headers (case-insensitive), the parsed JSON body (None when
    empty or not JSON), the provider's ``x-request-id`` (else ours)."""

    status: int
    headers: Mapping[str, str]
    body: Any
    request_id: str | None


def classify(status: int) -> ProviderErrorCode | None:
    """The contract's error code for an HTTP status; None for a 2xx."""
    if 200 <= status < 300:
        return None
    if status in (401, 403):
        return "provider_unauthorized"
    if status == 404:
        return "provider_not_found"
    if status == 429:
        return "rate_limited"
    if status in (408, 409) or not 400 <= status < 500:
        return "provider_unavailable"
    return "provider_rejected"


def provider_error(
    code: str,
    message: str,
    *,
    answer: ProviderAnswer | None,
    details: Any = None,
    retry_after_s: float | None = None,
) -> WorkerError:
    """The exception for ``code``: transient codes are retryable, the others permanent."""
    message = message[:MAX_MESSAGE_CHARS]
    if code in TRANSIENT_CODES:
        return ProviderUnavailable(
            code, message, retry_after_s=retry_after_s, details=details, provider=answer
        )
    return ProviderRejected(code, message, details=details, provider=answer)


@lru_cache(maxsize=4096)  # targets repeat; a URL is immutable, cheap to keep, costly to parse
def endpoint(base_url: str, *segments: str) -> httpx.URL:
    """``base_url`` + ``/``-joined, fully percent-encoded segments; ids cannot alter the path.

    Every byte of a segment but ``A-Z a-z 0-9 - . _ ~`` is percent-encoded, and httpx keeps an
    encoded path as it is (no decoding, no re-encoding), so ``/``, ``?``, ``#`` and ``%`` of an
    id stay inside its segment; ``.``, ``..`` and empty segments are refused.
    """
    for segment in segments:
        if segment in ("", ".", ".."):
            raise InvalidMessage("invalid_command", f"{segment!r} is not a valid path segment")
    path = "/".join(quote(segment, safe="") for segment in segments)
    return httpx.URL(f"{base_url}/{path}")


def parse_retry_after(value: str | None, now: datetime | float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date); None if unusable.

    ``now`` is an aware datetime or a POSIX timestamp; negative delays become 0.
    """
    if value is None:
        return None
    if _DELTA_SECONDS.match(value):
        return _seconds(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now_dt = now if isinstance(now, datetime) else datetime.fromtimestamp(now, UTC)
    return max(0.0, (when - now_dt).total_seconds())


def _seconds(value: str | None, scale: float = 1.0) -> float | None:
    """A non-negative finite number of seconds from a numeric header, else None."""
    if value is None:
        return None
    try:
        number = float(value) * scale
    except ValueError:
        return None
    return max(0.0, number) if math.isfinite(number) else None


def retry_after(
    headers: Mapping[str, str],
    *,
    now: datetime | float | None = None,
    reset_header: str | None = None,
) -> float | None:
    """How long the provider asked us to wait: ``retry-after-ms``, ``Retry-After``, then
    ``reset_header`` (seconds until a rate-limit window resets), whichever comes first."""
    delay = _seconds(headers.get("retry-after-ms"), 0.001)
    if delay is None:
        delay = parse_retry_after(headers.get("retry-after"), time.time() if now is None else now)
    if delay is None and reset_header is not None:
        delay = _seconds(headers.get(reset_header))
    return delay


def redact(value: Any, secrets: Iterable[str]) -> Any:
    """``value`` (JSON-like) with every occurrence of a secret replaced by ``[REDACTED]``."""
    hidden = tuple(secret for secret in secrets if secret)
    return _redact(value, hidden) if hidden else value


def _redact(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {_redact(k, secrets): _redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(item, secrets) for item in value]
    return value


def new_request_id() -> str:
    """A fresh 32-hex request id."""
    return uuid.uuid4().hex


class RequestObserver(Protocol):
    """Traces and times provider requests (:class:`worker.observability.observe.Observer`)."""

    def request_started(
        self, provider: str, method: str, url: httpx.URL, headers: Mapping[str, str]
    ) -> tuple[Any, Mapping[str, str]]:
        """A span (or None) and the headers to send (with ``traceparent`` when tracing)."""
        ...

    def request_finished(
        self,
        span: Any,
        provider: str,
        status_code: int | None,
        error_type: str | None,
        seconds: float,
    ) -> None:
        """The request ended: an answer's status, or why none came."""
        ...


class _NoCookies(httpx.Cookies):
    """A cookie store that keeps and sends nothing.

    Both providers authenticate with a header (``X-Auth-Token``, ``Authorization``), and a cookie
    one of them set would be shared by every command of every tenant.  httpx has no switch for
    it (encode/httpx#2992): its client runs every answer through ``http.cookiejar`` (~40 µs per
    request here, ``ops/bench/RESULTS.md``) unless ``cookies`` is a store that ignores them.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        """Keep nothing a provider sets."""

    def set_cookie_header(self, request: httpx.Request) -> None:
        """Send no ``Cookie`` header."""

    def __bool__(self) -> bool:
        return False


class ProviderClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` without cookies (:class:`_NoCookies`); everything else as httpx's."""

    _no_cookies = _NoCookies()

    @property
    def cookies(self) -> httpx.Cookies:
        """Always empty: cookies are neither kept nor sent."""
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        if cookies:
            raise ValueError("provider clients keep no cookies")


class JsonHttp:
    """One provider's connection pool: sends JSON, reads JSON, translates transport failures."""

    def __init__(
        self,
        config: ProviderConfig,
        observer: RequestObserver | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        backend: Backend = DEFAULT_BACKEND,
    ) -> None:
        self._config = config
        self._observer = observer
        self._closed = False
        self._client = ProviderClient(
            transport=transport or _transport(config.pool_size, backend),
            headers=_HEADERS,
            timeout=config.timeout_s,
            follow_redirects=False,
            trust_env=False,
        )
        # Every request is built from these (httpx's defaults and ours), not merged per call.
        self._headers = dict(self._client.headers)
        self._timeout = self._client.timeout.as_dict()

    def _open(self) -> httpx.AsyncClient:
        if self._closed:
            raise ProviderUnavailable(
                "provider_unavailable",
                f"{self._config.name} client is closed",
                provider=ProviderAnswer(self._config.name),
            )
        return self._client

    async def request(
        self,
        method: str,
        url: httpx.URL,
        *,
        headers: Mapping[str, str],
        body: Any,
        request_id: str | None = None,
    ) -> HttpAnswer:
        """Send ``body`` as JSON; the answer, whatever its status, or ProviderUnavailable."""
        client = self._open()
        name, timeout_s = self._config.name, self._config.timeout_s
        observer, span = self._observer, None
        if observer is not None:
            span, headers = observer.request_started(name, method, url, headers)
        status: int | None = None
        error: str | None = "cancelled"
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):  # httpx's timeouts are per phase
                response = await client.send(self._build(method, url, headers, body))
            response.stream = _SPENT  # read already; no cycle back to the response
            status, error = response.status_code, None
        except (TimeoutError, httpx.TimeoutException) as exc:
            error = "timeout"
            raise _unreachable(name, request_id, f"timed out after {timeout_s}s") from exc
        except httpx.RequestError as exc:  # every other TransportError; DecodingError
            error = type(exc).__name__
            raise _unreachable(name, request_id, error) from exc
        finally:
            if observer is not None:
                observer.request_finished(span, name, status, error, time.perf_counter() - started)
        code = response.status_code
        answer_id = response.headers.get("x-request-id", request_id)
        parsed = _parse(response.content, code, name, answer_id)
        return HttpAnswer(code, response.headers, parsed, answer_id)

    def _build(
        self, method: str, url: httpx.URL, headers: Mapping[str, str], body: Any
    ) -> httpx.Request:
        """The request ``client.request`` would build, without re-merging the client's defaults
        on every call (the base URL, params and cookies are empty; ``url`` is absolute)."""
        merged = self._headers.copy()
        merged.update(headers)
        return httpx.Request(
            method,
            url,
            headers=merged,
            content=orjson.dumps(body),
            extensions={"timeout": self._timeout},
        )

    async def aclose(self) -> None:
        """Close the pool; later requests raise ProviderUnavailable."""
        self._closed = True
        await self._client.aclose()


def _transport(pool_size: int, backend: Backend) -> httpx.AsyncBaseTransport:
    """A pool of ``pool_size`` connections (all of them kept alive 30 s), TLS verified."""
    limits = httpx.Limits(
        max_connections=pool_size,
        max_keepalive_connections=pool_size,
        keepalive_expiry=KEEPALIVE_S,
    )
    verify = ssl.create_default_context()  # the system's CAs, as aiohttp and urllib use
    if backend == "aiohttp":
        return AiohttpTransport(verify=verify, limits=limits, trust_env=False)
    return httpx.AsyncHTTPTransport(verify=verify, limits=limits, trust_env=False)


def _unreachable(name: ProviderName, request_id: str | None, why: str) -> ProviderUnavailable:
    return ProviderUnavailable(
        "provider_unavailable",
        f"{name} did not answer: {why}",
        provider=ProviderAnswer(name, None, request_id),
    )


def _parse(raw: bytes, status: int, name: ProviderName, request_id: str | None) -> Any:
    """The JSON body; None when empty, or when not JSON on an error status (the status decides)."""
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if classify(status) is not None:
            return None
        raise ProviderUnavailable(
            "provider_unavailable",
            f"{name} answered HTTP {status} with a body that is not JSON",
            provider=ProviderAnswer(name, status, request_id),
        ) from exc
