"""The language-neutral contract in ``schemas/``, generated from :mod:`worker.contract.messages`.

:func:`render` builds one JSON Schema (2020-12) per command, the command union (``oneOf`` with a
discriminator on ``type``), the result event, and an AsyncAPI 3.0.0 document of the RabbitMQ
topology of CONTRACT.md whose ``components.schemas`` embed the same models with every ``$ref``
pointing inside the document.  Output is deterministic (fixed construction order, schema keys
sorted, one trailing newline), so regenerating gives byte-identical files and :func:`stale` can
tell a test or CI that someone changed a model without running ``conference-worker schemas``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from worker.app.topology import (
    COMMAND_BINDING,
    DEAD_BINDING,
    command_queue_arguments,
    dead_queue_arguments,
)
from worker.contract.messages import (
    COMMAND_TYPES,
    CONTRACT_VERSION,
    Command,
    ConferenceUpdate,
    ErrorCode,
    ResultEvent,
    Status,
    SupervisorRoleChange,
)
from worker.settings import Topology

BASE_URI = f"https://conference-worker.dev/schemas/v{CONTRACT_VERSION}/"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI = "asyncapi.yaml"
_AMQP = "0.3.0"  # version of the AsyncAPI AMQP 0-9-1 bindings
_STATUSES: list[str] = list(get_args(Status))
_COMMANDS = ("conferenceUpdate", "supervisorRole")  # AsyncAPI message names, in COMMAND_TYPES order
_SCHEMA_FILES: dict[str, type[BaseModel] | None] = {
    "conference.update.schema.json": ConferenceUpdate,
    "conference.supervisor_role.schema.json": SupervisorRoleChange,
    "command.schema.json": None,  # the union of the commands, told apart by ``type``
    "result-event.schema.json": ResultEvent,
}
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


def render() -> dict[str, str]:
    """Every generated file: relative name -> exact text."""
    files = {name: _json_file(name, model) for name, model in _SCHEMA_FILES.items()}
    doc = yaml.dump(asyncapi(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return files | {ASYNCAPI: doc}


def write(directory: Path) -> list[Path]:
    """Write every generated file into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        (directory / name).write_text(text, encoding="utf-8", newline="\n")
        written.append(directory / name)
    return written


def stale(directory: Path) -> list[str]:
    """Names of generated files missing from ``directory`` or differing from :func:`render`."""

    def current(path: Path, text: str) -> bool:
        return path.is_file() and path.read_text(encoding="utf-8") == text

    return [name for name, text in render().items() if not current(directory / name, text)]


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document as a plain dict (its key order is the output order)."""
    return {
        "asyncapi": "3.0.0",
        "id": "urn:conference-worker",
        "info": {
            "title": "conference-worker",
            "version": CONTRACT_VERSION,
            "description": "The wire contract of the conference worker (CONTRACT.md). Generated "
            "from worker/contract/messages.py by `conference-worker schemas`; do not edit.",
            "license": {"name": "MIT"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {"host": "localhost:5672", "protocol": "amqp", "protocolVersion": "0.9.1"}
        },
        "channels": _channels(Topology()),
        "operations": _operations(),
        "components": _components(),
    }


class _Dumper(yaml.SafeDumper):
    """Never writes YAML anchors/aliases, so the document reads the same in every tool."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _sorted(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _sorted(node[key]) for key in sorted(node)}
    if isinstance(node, list):
        return [_sorted(item) for item in node]
    return node


def _json_file(name: str, model: type[BaseModel] | None) -> str:
    if model is None:
        schema = {"title": "Command", "description": "Any command, told apart by its type."}
        schema |= TypeAdapter(Command).json_schema()
    else:
        schema = model.model_json_schema()
    head = {"$schema": DIALECT, "$id": BASE_URI + name}
    head |= {"title": schema.pop("title"), "description": schema.pop("description")}
    return json.dumps(head | _sorted(schema), indent=2, ensure_ascii=False) + "\n"


def _exchange(name: str, kind: str = "topic") -> dict[str, Any]:
    exchange = {"name": name, "type": kind, "durable": True, "autoDelete": False, "vhost": "/"}
    return {"amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": _AMQP}}


def _queue(name: str) -> dict[str, Any]:
    queue = {"name": name, "durable": True, "exclusive": False, "autoDelete": False, "vhost": "/"}
    return {"amqp": {"is": "queue", "queue": queue, "bindingVersion": _AMQP}}


def _channel(address: str | None, bindings: Any, messages: Any, text: str) -> dict[str, Any]:
    amqp = bindings["amqp"]
    what = amqp["queue"] if amqp["is"] == "queue" else amqp["exchange"]
    kind = "quorum queue" if amqp["is"] == "queue" else f"{what['type']} exchange"
    return {
        "address": address,
        "title": f"{what['name'] or 'reply_to'} ({kind})",
        "description": text,
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
        "bindings": bindings,
    }


def _channels(top: Topology) -> dict[str, Any]:
    channels = {
        "commands": _channel(
            "{commandType}",
            _exchange(top.commands_exchange),
            _COMMANDS,
            "Publishers send commands here; the routing key is the command type.",
        ),
        "commandQueue": _channel(
            top.commands_queue,
            _queue(top.commands_queue),
            _COMMANDS,
            f"Bound to {top.commands_exchange} with {COMMAND_BINDING}. Its dead-letter exchange "
            "and delivery limit end a message that crashes workers again and again in the "
            "dead-letter queue instead of a loop.",
        ),
        "results": _channel(
            "{resultType}.{status}",
            _exchange(top.results_exchange),
            ["resultEvent"],
            "Every result event; unknown.<status> when the type could not be read.",
        ),
        "replyTo": _channel(
            None,
            _exchange("", "default"),
            ["resultEvent"],
            "The queue named by the command's reply_to property, when it has one.",
        ),
        "deadLetters": _channel(
            "{originalRoutingKey}",
            _exchange(top.dead_exchange),
            ["deadLetter"],
            "Dead letters, published with the command's own routing key.",
        ),
        "deadLetterQueue": _channel(
            top.dead_queue,
            _queue(top.dead_queue),
            ["deadLetter"],
            f"Bound to {top.dead_exchange} with {DEAD_BINDING}: every command that did not end in "
            "succeeded (duplicates aside); the queue the DLQ tooling lists and replays.",
        ),
    }
    command_type = {"enum": list(COMMAND_TYPES), "location": "$message.payload#/type"}
    channels["commands"]["parameters"] = {"commandType": command_type}
    channels["results"]["parameters"] = {
        "resultType": {"enum": [*COMMAND_TYPES, "unknown"]},
        "status": {"enum": _STATUSES, "location": "$message.payload#/status"},
    }
    routing_key = {"description": "The command's routing key."}
    channels["deadLetters"]["parameters"] = {"originalRoutingKey": routing_key}
    for name, exchange, key, arguments in (
        ("commandQueue", top.commands_exchange, COMMAND_BINDING, command_queue_arguments(top)),
        ("deadLetterQueue", top.dead_exchange, DEAD_BINDING, dead_queue_arguments()),
    ):
        channels[name]["x-binding"] = {"exchange": exchange, "key": key}
        channels[name]["x-arguments"] = arguments
    return channels


def _operation(action: str, channel: str, names: Any, summary: str, **binding: Any) -> Any:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in names],
        "bindings": {"amqp": binding | {"bindingVersion": _AMQP}},
    }


def _operations() -> dict[str, Any]:
    text = "Consume commands; each is acked only once the broker confirmed its result."
    receive = _operation("receive", "commandQueue", _COMMANDS, text, ack=True)
    receive["reply"] = {
        "address": {
            "location": "$message.header#/reply_to",
            "description": "The AMQP reply_to property (results go to both channels).",
        },
        "channel": {"$ref": "#/channels/replyTo"},
        "messages": [{"$ref": "#/channels/replyTo/messages/resultEvent"}],
    }
    results = _operation(
        "send", "results", ["resultEvent"], "One event per finished delivery.", deliveryMode=2
    )
    text = "The command's body and properties, with x- headers."
    dead = _operation("send", "deadLetters", ["deadLetter"], text, deliveryMode=2, mandatory=True)
    return {"receiveCommands": receive, "sendResults": results, "sendDeadLetters": dead}


def _message(title: str, payload: str, correlation: str, examples: Any) -> dict[str, Any]:
    headers = "DeadLetterHeaders" if payload == "DeadLetterBody" else "TraceHeaders"
    return {
        "name": payload,
        "title": title,
        "contentType": "application/json",
        "correlationId": {"$ref": f"#/components/correlationIds/{correlation}"},
        "headers": {"$ref": f"#/components/schemas/{headers}"},
        "payload": {"$ref": f"#/components/schemas/{payload}"},
        "examples": examples,
    }


def _components() -> dict[str, Any]:
    result = _message("Result event", "ResultEvent", "result", RESULT_EXAMPLES)
    result["bindings"] = {"amqp": {"messageType": "result", "bindingVersion": _AMQP}}
    update = _message(COMMAND_TYPES[0], "ConferenceUpdate", "command", UPDATE_EXAMPLES)
    role = _message(COMMAND_TYPES[1], "SupervisorRoleChange", "command", ROLE_EXAMPLES)
    dead = _message("Dead letter", "DeadLetterBody", "command", DEAD_EXAMPLES)
    where = "$message.header#/correlation_id"  # the AMQP property, not an application header
    return {
        "schemas": _component_schemas(),
        "messages": dict(zip(_COMMANDS, (update, role), strict=True))
        | {"resultEvent": result, "deadLetter": dead},
        "correlationIds": {
            "command": {"description": "Optional; echoed on the result.", "location": where},
            "result": {"description": "The command's, else its command_id.", "location": where},
        },
    }


def _component_schemas() -> dict[str, Any]:
    mode: JsonSchemaMode = "validation"
    models = [(model, mode) for model in _SCHEMA_FILES.values() if model is not None]
    _, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = dict(top["$defs"])
    schemas["TraceHeaders"] = {"type": "object", "properties": _TRACE_HEADERS}
    extra = {
        "x-death": {"type": "array", "description": "Set by RabbitMQ when it dead-letters."},
    }
    schemas["DeadLetterHeaders"] = {
        "type": "object",
        "description": "The command's own headers, plus why it was dead-lettered: the worker's "
        "x- headers, or RabbitMQ's x-death when the command queue's delivery limit was reached.",
        "properties": _TRACE_HEADERS | _DEAD_HEADERS | extra,
        "anyOf": [{"required": list(_DEAD_HEADERS)}, {"required": ["x-death"]}],
    }
    schemas["DeadLetterBody"] = {"description": "The command's body as it came (maybe not JSON)."}
    return dict(_sorted(schemas))


# Examples: each validates against its schema and its model (tests/unit/test_contract.py).
_TRACE = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
_CONF = "8d0ee5a1b6f04a4c9a3e7b2f1c6d9e20"
_IDS = {"account_id": "4b31dd1d32ce6d249897c06332375d65", "conference_id": _CONF}
_DOC = {
    "name": "Weekly sales call",
    "conference_numbers": ["5001"],
    "member": {"pins": ["1234"], "join_muted": True},
    "play_entry_tone": True,
    "profile": {"max-members": 50, "rate": 16000},
}
_UPDATE: dict[str, Any] = {"command_id": "crm-7f3a9c1e-0001", "type": "conference.update", **_IDS}
_UPDATE |= {"expires_at": "2025-01-15T10:05:00+00:00", "conference": _DOC}
_MERGE: dict[str, Any] = {"command_id": "crm-7f3a9c1e-0002", "type": "conference.update", **_IDS}
_MERGE |= {"mode": "merge", "conference": {"name": "EMEA sales", "profile": {"max-members": None}}}
_ROLE = {
    "command_id": "cc-4411-whisper-1",
    "type": "conference.supervisor_role",
    "issued_at": "2025-01-15T10:00:00Z",
    "conference_id": "3fa85f64-5717-4562-b3fc-2c963f66afa6",
    "call_control_id": "v3:MdI91X4lWFEs7IgbBEOT9M4AigoY08M0WWZFISt1Yw2axZ_IiE4pqg",
    "supervisor_role": "whisper",
    "whisper_call_control_ids": ["v3:Sg1xxxQ_U3ixxx7XTkAItg1rKMatL6qIgbkYc"],
    "region": "Europe",
}
UPDATE_EXAMPLES = [
    {"name": "replace", "summary": "Replace a conference", "headers": _TRACE, "payload": _UPDATE},
    {"name": "merge", "summary": "Rename it; null deletes max-members", "payload": _MERGE},
]
ROLE_EXAMPLES = [{"name": "whisper", "summary": "Whisper to an agent", "payload": _ROLE}]


def _event(command: dict[str, Any], status: str, code: int | None, **extra: Any) -> Any:
    """A result event for ``command`` as the worker publishes it: every field present."""
    name = "telnyx" if command.get("type") == "conference.supervisor_role" else "vinix"
    provider = {"name": name, "status_code": code, "request_id": f"req-{name}-{code}"}
    return {
        "command_id": command.get("command_id"),
        "type": command.get("type"),
        "status": status,
        "duplicate": False,
        "attempts": 1 if code and not extra.get("duplicate") else 0,
        "error": None,
        "provider": provider if code else None,
        "data": None,
        "received_at": "2025-01-15T10:00:00.120000+00:00",
        "completed_at": "2025-01-15T10:00:00.480000+00:00",
    } | extra


def _error(code: str, message: str, retryable: bool = False, details: Any = None) -> Any:
    return {"code": code, "message": message, "retryable": retryable, "details": details}


_SAVED = {"id": _CONF} | _DOC
_INVALID = _error(
    "invalid_command",
    "account_id: String should match pattern",
    details=[{"field": "account_id", "message": "String should match pattern", "type": "pattern"}],
)
_UNKNOWN = _error(
    "unknown_type", "unknown command type; expected one of " + ", ".join(COMMAND_TYPES)
)
_NOT_FOUND = _error("provider_not_found", "vinix answered 404: bad identifier")
_UNAVAILABLE = _error("provider_unavailable", "vinix answered 503", retryable=True)
_EXPIRED = _error("expired", "expires_at passed before the command could succeed")
_BAD = {"command_id": "crm-bad-1", "type": "conference.update"}
_RESULTS = [
    ("Vinix saved the conference", _event(_UPDATE, "succeeded", 200, data=_SAVED)),
    ("Telnyx accepted the change", _event(_ROLE, "succeeded", 200, data={"result": "ok"})),
    ("A duplicate delivery", _event(_UPDATE, "succeeded", 200, duplicate=True, data=_SAVED)),
    ("Invalid, so never sent", _event(_BAD, "rejected", None, error=_INVALID)),
    ("An unknown type", _event({"type": "conference.delete"}, "rejected", None, error=_UNKNOWN)),
    ("Vinix answered 404", _event(_UPDATE, "rejected", 404, error=_NOT_FOUND)),
    ("Out of retries", _event(_UPDATE, "failed", 503, attempts=5, error=_UNAVAILABLE)),
    ("expires_at passed", _event(_ROLE, "expired", 429, attempts=2, error=_EXPIRED)),
]


def _result_example(number: int, summary: str, event: dict[str, Any]) -> dict[str, Any]:
    key = f"{event['type'] if event['type'] in COMMAND_TYPES else 'unknown'}.{event['status']}"
    summary = f"{summary} (routing key {key})"
    return {"name": f"{key}-{number}", "summary": summary, "headers": _TRACE, "payload": event}


RESULT_EXAMPLES = [_result_example(n, text, event) for n, (text, event) in enumerate(_RESULTS, 1)]
_X_HEADERS = {
    "x-error-code": "provider_unavailable",
    "x-error-message": "vinix answered 503",
    "x-attempts": 5,
    "x-original-routing-key": "conference.update",
    "x-failed-at": "2025-01-15T10:00:31.002000+00:00",
}
DEAD_EXAMPLES = [{"name": "failed", "headers": _TRACE | _X_HEADERS, "payload": _UPDATE}]
