"""The sandbox's admin API under ``/__admin/`` (WireMock style, no authentication).

=========================  =====================================================================
``GET /__admin/health``    200 ``{"status": "ok"}``
``GET /__admin/fixtures``  the demo data: keys, account, conference and call ids
``GET /__admin/requests``  ``{"requests": [...]}`` oldest first (``?provider=`` filters)
``DELETE …/requests``      forget them
``POST /__admin/faults``   add one fault or a list (201 ``{"faults": [...]}`` with their ids)
``GET /__admin/faults``    the active faults
``DELETE …/faults[/ID]``   remove every fault, or one
``GET /__admin/state``     ``{"vinix": {conference_id: doc}, "telnyx": {conference_id:
                           {call_control_id: role}}}``
``GET|POST …/config``      read or change settings (see :class:`ConfigChange`)
``POST /__admin/reset``    demo data, settings, faults and the request log back to the start
=========================  =====================================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.sandbox.faults import FaultSpecError
from worker.sandbox.limits import RateWindow

if TYPE_CHECKING:
    from worker.sandbox.server import Sandbox

SANDBOX_KEY: web.AppKey[Sandbox] = web.AppKey("sandbox")


class ConfigChange(BaseModel):
    """What ``POST /__admin/config`` accepts; every field is optional.

    ``rate_limit_rps`` needs ``provider`` and ``null`` turns the limit off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Literal["vinix", "telnyx"] | None = None
    rate_limit_rps: int | None = Field(None, ge=1)
    vinix_error_shape: Literal["kazoo", "seed"] | None = None
    vinix_token_buckets: bool | None = None
    token_ttl_s: float | None = Field(None, ge=0)
    telnyx_dedup_ttl_s: float | None = Field(None, ge=0)
    latency_ms: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _rate_limit_names_provider(self) -> ConfigChange:
        if "rate_limit_rps" in self.model_fields_set and self.provider is None:
            raise ValueError("rate_limit_rps needs a provider")
        return self


def apply_config(sandbox: Sandbox, change: ConfigChange) -> None:
    """Apply the fields that were given."""
    given = change.model_fields_set
    if "rate_limit_rps" in given and change.provider is not None:
        rps = change.rate_limit_rps
        window = RateWindow(sandbox.clock, rps) if rps is not None else None
        api = sandbox.vinix if change.provider == "vinix" else sandbox.telnyx
        api.rate_limit = window
    if change.vinix_error_shape is not None:
        sandbox.vinix.error_shape = change.vinix_error_shape
    if change.vinix_token_buckets is not None:
        sandbox.vinix.buckets.enabled = change.vinix_token_buckets
    if change.token_ttl_s is not None:
        sandbox.token_ttl_s = change.token_ttl_s
    if change.telnyx_dedup_ttl_s is not None:
        sandbox.telnyx.dedup_ttl_s = change.telnyx_dedup_ttl_s
    if change.latency_ms is not None:
        sandbox.latency_ms = change.latency_ms


def current_config(sandbox: Sandbox) -> dict[str, Any]:
    """Every setting :class:`ConfigChange` can change, with its value now."""
    vinix, telnyx = sandbox.vinix, sandbox.telnyx
    return {
        "latency_ms": sandbox.latency_ms,
        "rate_limit_rps": {
            "vinix": vinix.rate_limit.limit if vinix.rate_limit else None,
            "telnyx": telnyx.rate_limit.limit if telnyx.rate_limit else None,
        },
        "telnyx_dedup_ttl_s": telnyx.dedup_ttl_s,
        "token_ttl_s": sandbox.token_ttl_s,
        "vinix_error_shape": vinix.error_shape,
        "vinix_token_buckets": vinix.buckets.enabled,
    }


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _bad_request(message: str) -> web.Response:
    return _json({"error": message}, 400)


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    return orjson.loads(raw) if raw.strip() else {}


def _sandbox(request: web.Request) -> Sandbox:
    return request.app[SANDBOX_KEY]


async def health(request: web.Request) -> web.Response:
    """The sandbox is up."""
    return _json({"status": "ok"})


async def fixtures(request: web.Request) -> web.Response:
    """The demo data."""
    return web.Response(body=_sandbox(request).fixtures_json, content_type="application/json")


async def list_requests(request: web.Request) -> web.Response:
    """The provider requests received, oldest first."""
    provider = request.query.get("provider")
    return _json({"requests": _sandbox(request).requests.entries(provider)})


async def clear_requests(request: web.Request) -> web.Response:
    """Forget the provider requests received."""
    return _json({"deleted": _sandbox(request).requests.clear()})


async def add_faults(request: web.Request) -> web.Response:
    """Add one fault or a list of faults."""
    try:
        added = _sandbox(request).faults.add(await _body(request))
    except (orjson.JSONDecodeError, FaultSpecError) as exc:
        return _bad_request(str(exc))
    return _json({"faults": [fault.describe() for fault in added]}, 201)


async def list_faults(request: web.Request) -> web.Response:
    """The active faults."""
    return _json({"faults": _sandbox(request).faults.describe()})


async def clear_faults(request: web.Request) -> web.Response:
    """Remove every fault."""
    return _json({"deleted": _sandbox(request).faults.clear()})


async def remove_fault(request: web.Request) -> web.Response:
    """Remove one fault by id."""
    fault_id = request.match_info["fault_id"]
    if not fault_id.isdigit() or not _sandbox(request).faults.remove(int(fault_id)):
        return _json({"error": f"no fault {fault_id}"}, 404)
    return _json({"deleted": 1})


async def state(request: web.Request) -> web.Response:
    """The Vinix documents and the Telnyx roles."""
    return _json(_sandbox(request).state())


async def get_config(request: web.Request) -> web.Response:
    """The settings."""
    return _json(current_config(_sandbox(request)))


async def post_config(request: web.Request) -> web.Response:
    """Change settings."""
    sandbox = _sandbox(request)
    try:
        change = ConfigChange.model_validate(await _body(request))
    except (orjson.JSONDecodeError, ValidationError) as exc:
        return _bad_request(str(exc))
    apply_config(sandbox, change)
    return _json(current_config(sandbox))


async def reset(request: web.Request) -> web.Response:
    """Everything back to the start."""
    sandbox = _sandbox(request)
    sandbox.reset()
    sandbox.faults.clear()
    sandbox.requests.clear()
    return _json({"status": "reset"})


async def unknown(request: web.Request) -> web.Response:
    """Any other admin path."""
    return _json({"error": f"no admin endpoint {request.method} {request.path}"}, 404)


def add_admin_routes(app: web.Application, sandbox: Sandbox) -> None:
    """Mount the admin API on ``app``."""
    app[SANDBOX_KEY] = sandbox
    app.router.add_routes(
        [
            web.get("/__admin/health", health),
            web.get("/__admin/fixtures", fixtures),
            web.get("/__admin/requests", list_requests),
            web.delete("/__admin/requests", clear_requests),
            web.post("/__admin/faults", add_faults),
            web.get("/__admin/faults", list_faults),
            web.delete("/__admin/faults", clear_faults),
            web.delete("/__admin/faults/{fault_id}", remove_fault),
            web.get("/__admin/state", state),
            web.get("/__admin/config", get_config),
            web.post("/__admin/config", post_config),
            web.post("/__admin/reset", reset),
            web.route("*", "/__admin/{tail:.*}", unknown),
        ]
    )
