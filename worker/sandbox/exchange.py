"""One provider request and its answer, independent of aiohttp: :class:`Call` and :class:`Reply`.

The server reads the body and parses the JSON once (the request log needs it too); the provider
simulators route on :attr:`Call.segments`, the percent-decoded segments of the path exactly as
it was received, so an encoded ``/`` inside an id stays inside that id.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy, MultiMapping

JSON_TYPE = "application/json"


@dataclass(slots=True)
class Call:
    """A request to one of the simulated providers."""

    method: str
    raw_path: str
    segments: list[str]
    headers: CIMultiDictProxy[str]
    query: MultiMapping[str]
    client_ip: str
    request_id: str
    json: Any = None
    json_error: str | None = None
    has_body: bool = False

    @classmethod
    def from_request(cls, request: web.Request, body: bytes) -> Call:
        """The call for an aiohttp request whose body was read already."""
        raw_path = request.rel_url.raw_path
        headers = request.headers
        call = cls(
            method=request.method,
            raw_path=raw_path,
            segments=[unquote(part) for part in raw_path.split("/")[1:]],
            headers=headers,
            query=request.query,
            client_ip=request.remote or "",
            request_id=headers.get("X-Request-ID") or secrets.token_hex(16),
            has_body=bool(body.strip()),
        )
        if call.has_body:
            call.parse(body)
        return call

    def parse(self, body: bytes) -> None:
        """Parse ``body`` as JSON into :attr:`json`, or describe why it is not JSON."""
        try:
            self.json = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            self.json_error = f"{exc.msg} around {exc.pos}"


@dataclass(slots=True)
class Reply:
    """A provider's answer: status, a JSON-able body, extra headers."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> web.Response:
        """The aiohttp response."""
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body),
            headers={"Content-Type": JSON_TYPE, **self.headers},
        )
