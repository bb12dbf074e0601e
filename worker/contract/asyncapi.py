"""The AsyncAPI document of the contract: FastStream's, from the worker's real app.

:func:`document` builds the FastStream app exactly as the worker does (:func:`worker.app.broker.
build` and :func:`worker.app.broker.subscribe`, default topology, a fixed URL so that the
output does not depend on the machine) and asks FastStream for its AsyncAPI 3.0.0 document:
the command subscriber and the result, ``reply_to`` and dead-letter publishers, with the
payload schemas of the models.  Change a subscriber or a publisher and the document changes,
so ``schemas/`` goes stale (``conference-worker schemas --check`` fails).

FastStream has no place for a few things the contract says; :func:`_annotate` adds them to its
document, never replacing what FastStream wrote: the contract version and description, each
message's content type, header schemas (W3C trace context; the dead-letter ``x-`` headers),
examples (:mod:`worker.contract.examples`), the parameters of the channel addresses, the
command queue's binding and arguments, and the dead-letter queue (declared by the worker and
read by the operator tools, not subscribed to by the worker, so FastStream does not see it).
"""

from __future__ import annotations

from typing import Any, get_args

from faststream.specification import AsyncAPI
from pydantic import SecretStr

from worker.app import broker as app_broker
from worker.app.topology import (
    COMMAND_BINDING,
    DEAD_BINDING,
    commands_queue,
    dead_queue_arguments,
)
from worker.contract.examples import (
    COMMAND_EXAMPLES,
    DEAD_EXAMPLES,
    RESULT_EXAMPLES,
)
from worker.contract.messages import COMMAND_TYPES, CONTRACT_VERSION, ErrorCode, Status
from worker.settings import BrokerConfig, Topology

SPEC_URL = "amqp://guest:guest@localhost:5672/"
_AMQP = "0.3.0"  # version of the AsyncAPI AMQP 0-9-1 bindings
_TRACE_HEADERS = {
    "traceparent": {
        "type": "string",
        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$",
        "description": "W3C trace context (continued by the worker; set on what it publishes).",
    },
    "tracestate": {"type": "string", "description": "W3C trace context vendor state."},
}
_DEAD_HEADERS = {
    "x-error-code": {"enum": list(get_args(ErrorCode)), "description": "The error code."},
    "x-error-message": {"type": "string", "description": "The error message (truncated)."},
    "x-attempts": {"type": "integer", "minimum": 0, "description": "Provider calls made."},
    "x-original-routing-key": {"type": "string", "description": "The command's routing key."},
    "x-failed-at": {"type": "string", "format": "date-time", "description": "RFC 3339 time."},
}
_REPLAY_HEADERS = {  # optional: only on a dead letter that was replayed and failed again
    "x-replay-count": {
        "type": "integer",
        "minimum": 1,
        "description": "Times an operator replayed it (set by the replay; since 1.2).",
    },
    "x-replayed-at": {
        "type": "string",
        "format": "date-time",
        "description": "The last replay's time (set by the replay; since 1.2).",
    },
}
_DESCRIPTION = (
    "The wire contract of the conference worker (CONTRACT.md): FastStream's document of the "
    "worker's subscriber and publishers, with the contract's headers and examples. Generated "
    "by `conference-worker schemas`; do not edit."
)


DOCUMENTED_PARTITIONS = 16  # Settings' default: the document shows the intake queue


async def _never(_: Any) -> None:  # the document's handler: never called
    raise AssertionError("the AsyncAPI app does not consume")


def app(topology: Topology | None = None) -> app_broker.App:
    """The worker's FastStream app, unconnected, as the AsyncAPI document sees it."""
    topology = topology or Topology(partitions=DOCUMENTED_PARTITIONS)
    built = app_broker.build(BrokerConfig(url=SecretStr(SPEC_URL)), topology)
    app_broker.subscribe(built.broker, topology, _never)
    return built


def document(topology: Topology | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of the worker's app, annotated (see the module docstring)."""
    topology = topology or Topology(partitions=DOCUMENTED_PARTITIONS)
    spec = AsyncAPI(
        app(topology).broker,
        title="conference-worker",
        version=CONTRACT_VERSION,
        description=_DESCRIPTION,
        license={"name": "MIT"},
        identifier="urn:conference-worker",
        schema_version="3.0.0",
    )
    doc: dict[str, Any] = spec.to_specification().to_jsonable()
    _annotate(doc, topology)
    return _ordered(doc)


def _ordered(doc: dict[str, Any]) -> dict[str, Any]:
    """Channels, operations, messages and schemas by name (FastStream keeps publishers in no
    fixed order), so that the same app always renders the same bytes."""
    for part in (doc, doc["components"]):
        for key in ("channels", "operations", "messages", "schemas"):
            if key in part:
                part[key] = dict(sorted(part[key].items()))
    return doc


def _annotate(doc: dict[str, Any], top: Topology) -> None:
    """Add to FastStream's document what it has no place for (never replacing what it wrote)."""
    channels, messages = doc["channels"], doc["components"]["messages"]
    schemas = doc["components"]["schemas"]
    schemas["TraceHeaders"] = {"type": "object", "properties": _TRACE_HEADERS}
    schemas["DeadLetterHeaders"] = _dead_letter_headers()
    for channel, headers, examples in (
        (top.intake_queue, "TraceHeaders", COMMAND_EXAMPLES),
        (top.results_exchange, "TraceHeaders", RESULT_EXAMPLES),
        ("reply_to", "TraceHeaders", RESULT_EXAMPLES),
        (top.dead_exchange, "DeadLetterHeaders", DEAD_EXAMPLES),
    ):
        for ref in channels[channel]["messages"].values():
            message = messages[ref["$ref"].rsplit("/", 1)[1]]
            message["contentType"] = "application/json"
            message["headers"] = {"$ref": f"#/components/schemas/{headers}"}
            message["examples"] = examples
    _parameters(channels, top)
    queue = channels[top.intake_queue]
    queue["x-binding"] = {"exchange": top.commands_exchange, "key": COMMAND_BINDING}
    queue["x-arguments"] = commands_queue(top).arguments
    dead_payload = schemas[_payload_of(doc, top.dead_exchange)]
    dead_payload["description"] = "The command's body as it came (maybe not JSON)."
    channels[top.dead_queue] = _dead_queue(doc, top)


def _payload_of(doc: dict[str, Any], channel: str) -> str:
    """The name of the payload schema of ``channel``'s (one) message."""
    (ref,) = doc["channels"][channel]["messages"].values()
    message = doc["components"]["messages"][ref["$ref"].rsplit("/", 1)[1]]
    name: str = message["payload"]["$ref"].rsplit("/", 1)[1]
    return name


def _parameters(channels: dict[str, Any], top: Topology) -> None:
    """The parameters of the publishers' addresses (``{type}.{status}`` and the others)."""
    channels[top.results_exchange]["parameters"] = {
        "type": {"enum": [*COMMAND_TYPES, "unknown"], "location": "$message.payload#/type"},
        "status": {"enum": list(get_args(Status)), "location": "$message.payload#/status"},
    }
    channels["reply_to"]["parameters"] = {
        "reply_to": {"description": "The command's AMQP reply_to property."}
    }
    channels[top.dead_exchange]["parameters"] = {
        "routing_key": {"description": "The command's own routing key."}
    }


def _dead_letter_headers() -> dict[str, Any]:
    extra = {"x-death": {"type": "array", "description": "Set by RabbitMQ when it dead-letters."}}
    return {
        "type": "object",
        "description": "The command's own headers, plus why it was dead-lettered: the worker's "
        "x- headers, or RabbitMQ's x-death when the command queue's delivery limit was reached.",
        "properties": _TRACE_HEADERS | _DEAD_HEADERS | _REPLAY_HEADERS | extra,
        "anyOf": [{"required": list(_DEAD_HEADERS)}, {"required": ["x-death"]}],
    }


def _dead_queue(doc: dict[str, Any], top: Topology) -> dict[str, Any]:
    """The dead-letter queue's channel: it holds what the dead-letter publisher sends."""
    queue = {
        "name": top.dead_queue,
        "durable": True,
        "exclusive": False,
        "autoDelete": False,
        "vhost": "/",
    }
    return {
        "address": top.dead_queue,
        "description": f"Bound to {top.dead_exchange} with {DEAD_BINDING}: every command that "
        "did not end in succeeded (duplicates aside); the queue the DLQ tooling lists and "
        "replays. Declared by the worker; read by the operator tools.",
        "messages": dict(doc["channels"][top.dead_exchange]["messages"]),
        "bindings": {"amqp": {"is": "queue", "queue": queue, "bindingVersion": _AMQP}},
        "x-binding": {"exchange": top.dead_exchange, "key": DEAD_BINDING},
        "x-arguments": dead_queue_arguments(),
    }
