"""The language-neutral contract in ``schemas/``: JSON Schemas and the AsyncAPI document.

:func:`render` builds one JSON Schema (2020-12) per command from :mod:`worker.contract.messages`,
the command union (``oneOf`` with a discriminator on ``type``) and the result event, plus the
AsyncAPI 3.0.0 document, which is FastStream's document of the worker's own app
(:mod:`worker.contract.asyncapi`).  Output is deterministic (fixed construction order, schema
keys sorted, one trailing newline), so regenerating gives byte-identical files and
:func:`stale` can tell a test or CI that someone changed a model, a subscriber or a publisher
without running ``conference-worker schemas``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter

from worker.contract.asyncapi import document
from worker.contract.messages import (
    CONTRACT_VERSION,
    Command,
    ConferenceUpdate,
    ResultEvent,
    SupervisorRoleChange,
)

BASE_URI = f"https://conference-worker.dev/schemas/v{CONTRACT_VERSION}/"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI = "asyncapi.yaml"
_SCHEMA_FILES: dict[str, type[BaseModel] | None] = {
    "conference.update.schema.json": ConferenceUpdate,
    "conference.supervisor_role.schema.json": SupervisorRoleChange,
    "command.schema.json": None,  # the union of the commands, told apart by ``type``
    "result-event.schema.json": ResultEvent,
}


def render(asyncapi: dict[str, Any] | None = None) -> dict[str, str]:
    """Every generated file: relative name -> exact text (``asyncapi``: another document)."""
    files = {name: _json_file(name, model) for name, model in _SCHEMA_FILES.items()}
    doc = yaml.dump(
        document() if asyncapi is None else asyncapi,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
    )
    return files | {ASYNCAPI: doc}


def write(directory: Path) -> list[Path]:
    """Write every generated file into ``directory``; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        (directory / name).write_text(text, encoding="utf-8", newline="\n")
        written.append(directory / name)
    return written


def stale(directory: Path, rendered: dict[str, str] | None = None) -> list[str]:
    """Names of generated files missing from ``directory`` or differing from :func:`render`."""

    def current(path: Path, text: str) -> bool:
        return path.is_file() and path.read_text(encoding="utf-8") == text

    rendered = render() if rendered is None else rendered
    return [name for name, text in rendered.items() if not current(directory / name, text)]


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
