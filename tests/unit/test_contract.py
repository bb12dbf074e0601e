"""The generated contract in ``schemas/``: current, well-formed, examples valid, and saying the
same thing as CONTRACT.md."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from pydantic import TypeAdapter
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from worker.contract import schemas as contract
from worker.contract.messages import Command, ResultEvent

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_MD = ROOT / "CONTRACT.md"
REGENERATE = (
    '.venv/bin/python -c "from pathlib import Path; from worker.contract.schemas import write; '
    "write(Path('schemas'))\"  (or: conference-worker schemas)"
)
DOC_URI = "urn:asyncapi"
COMMAND = TypeAdapter(Command)
INTAKE = "conference-worker.commands.intake"  # the queue publishers' commands land in


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return contract.render()


@pytest.fixture(scope="module")
def doc(files: dict[str, str]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(files[contract.ASYNCAPI])
    return loaded


@pytest.fixture(scope="module")
def schemas(files: dict[str, str]) -> dict[str, Any]:
    return {name: json.loads(text) for name, text in files.items() if name.endswith(".json")}


def refs(node: Any) -> Iterator[str]:
    """Every ``$ref`` value in a JSON-like tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def pointer(document: Any, ref: str) -> Any:
    """Follow a local JSON pointer (``#/a/b``); KeyError when it leads nowhere."""
    assert ref.startswith("#/"), f"{ref} is not local"
    node = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def validator_for(doc: dict[str, Any], ref: str) -> Draft202012Validator:
    """A validator of the schema at ``ref`` inside the AsyncAPI document."""
    registry: Registry[Any] = Registry().with_resource(DOC_URI, DRAFT202012.create_resource(doc))
    schema = {"$ref": f"{DOC_URI}{ref}"}
    return Draft202012Validator(
        schema, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def payload_name(doc: dict[str, Any], message: dict[str, Any]) -> str:
    """The name of a message's payload schema in ``components.schemas``."""
    name: str = message["payload"]["$ref"].rsplit("/", 1)[1]
    return name


def examples(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(payload kind, example) of every message: ``command``, ``result`` or ``dead``."""
    kinds = {"ResultEvent": "result"}
    found: list[tuple[str, dict[str, Any]]] = []
    for name, message in doc["components"]["messages"].items():
        payload = payload_name(doc, message)
        kind = kinds.get(payload, "dead" if name.startswith("conference.dead") else "command")
        found.extend((kind, example) for example in message["examples"])
    return found


def message_of(doc: dict[str, Any], channel: str) -> dict[str, Any]:
    """The (one) message of ``channel``."""
    (ref,) = doc["channels"][channel]["messages"].values()
    message: dict[str, Any] = doc["components"]["messages"][ref["$ref"].rsplit("/", 1)[1]]
    return message


# (a) schemas/ is what the models generate ------------------------------------------------------


def test_schemas_directory_is_current() -> None:
    """schemas/ holds exactly what worker/contract/schemas.py renders from the models."""
    stale = contract.stale(ROOT / "schemas")
    assert not stale, f"schemas/ is stale ({', '.join(stale)}); regenerate with: {REGENERATE}"


def test_render_is_deterministic(files: dict[str, str]) -> None:
    """Rendering twice gives the same bytes, each file ending in exactly one newline."""
    assert contract.render() == files
    assert set(files) == {
        "conference.update.schema.json",
        "conference.supervisor_role.schema.json",
        "command.schema.json",
        "result-event.schema.json",
        "asyncapi.yaml",
    }
    for text in files.values():
        assert text.endswith("\n")
        assert not text.endswith("\n\n")


def test_write_then_stale(tmp_path: Path) -> None:
    """stale() names missing and changed files; write() makes the directory current."""
    assert sorted(contract.stale(tmp_path)) == sorted(contract.render())
    written = contract.write(tmp_path / "schemas")
    assert sorted(p.name for p in written) == sorted(contract.render())
    assert contract.stale(tmp_path / "schemas") == []
    written[0].write_text(written[0].read_text(encoding="utf-8") + " ", encoding="utf-8")
    assert contract.stale(tmp_path / "schemas") == [written[0].name]


# (b) every example validates --------------------------------------------------------------------


def test_every_example_validates_against_its_schemas(doc: dict[str, Any]) -> None:
    """Each AsyncAPI example's payload and headers validate against the message's schemas."""
    for name, message in doc["components"]["messages"].items():
        assert message["examples"], name
        for example in message["examples"]:
            payload = validator_for(doc, message["payload"]["$ref"])
            errors = [e.message for e in payload.iter_errors(example["payload"])]
            assert not errors, f"{name}/{example['name']} payload: {errors}"
            headers = validator_for(doc, message["headers"]["$ref"])
            errors = [e.message for e in headers.iter_errors(example.get("headers", {}))]
            assert not errors, f"{name}/{example['name']} headers: {errors}"


def test_every_example_validates_against_the_json_schema_files(
    doc: dict[str, Any], schemas: dict[str, Any]
) -> None:
    """The standalone JSON Schemas accept the same examples as the embedded ones."""
    checker = Draft202012Validator.FORMAT_CHECKER
    for kind, example in examples(doc):
        payload = example["payload"]
        if kind == "result":
            files = ["result-event.schema.json"]
        else:
            files = ["command.schema.json", f"{payload['type']}.schema.json"]
        for file in files:
            validator = Draft202012Validator(schemas[file], format_checker=checker)
            errors = [e.message for e in validator.iter_errors(payload)]
            assert not errors, f"{kind}/{example['name']} against {file}: {errors}"


def test_every_example_is_accepted_by_the_models(doc: dict[str, Any]) -> None:
    """Command examples decode as the worker decodes; result examples are ResultEvents."""
    for kind, example in examples(doc):
        if kind == "result":
            ResultEvent.model_validate(example["payload"])
        else:
            COMMAND.validate_json(json.dumps(example["payload"]))


def test_examples_cover_every_command_type_and_status(doc: dict[str, Any]) -> None:
    """There are examples for both commands and for every status, plus a duplicate."""
    payloads = [example["payload"] for kind, example in examples(doc) if kind == "result"]
    assert {p["status"] for p in payloads} == {"succeeded", "rejected", "failed", "expired"}
    assert any(p["duplicate"] for p in payloads)
    commands = [ex["payload"]["type"] for kind, ex in examples(doc) if kind == "command"]
    assert set(commands) == {"conference.update", "conference.supervisor_role"}
    assert {p["type"] for p in payloads} >= set(commands)


def test_the_document_is_faststreams_view_of_the_worker_app(doc: dict[str, Any]) -> None:
    """The subscriber's payload is the command union, the publishers' what they send."""
    commands = message_of(doc, INTAKE)
    union = doc["components"]["schemas"][payload_name(doc, commands)]
    refs_ = {item["$ref"].rsplit("/", 1)[1] for item in union["oneOf"]}
    assert refs_ == {"ConferenceUpdate", "SupervisorRoleChange"}
    for channel in ("conference.results", "reply_to"):
        assert payload_name(doc, message_of(doc, channel)) == "ResultEvent"
    assert doc["operations"][INTAKE]["bindings"]["amqp"]["ack"] is True


def test_the_document_shows_the_partitioned_intake(doc: dict[str, Any]) -> None:
    """The document renders the default (partitioned) layout: publishers' commands go to the
    intake queue, bound to the commands exchange with ``conference.*``, a single-active-consumer
    quorum queue; neither the old single queue nor the worker's own partitions are channels."""
    from worker.contract.asyncapi import DOCUMENTED_PARTITIONS
    from worker.settings import Settings, Topology

    assert Settings.model_fields["partitions"].default == DOCUMENTED_PARTITIONS
    intake = doc["channels"][INTAKE]
    assert intake["bindings"]["amqp"]["queue"]["name"] == INTAKE
    assert intake["x-binding"] == {"exchange": "conference.commands", "key": "conference.*"}
    arguments = intake["x-arguments"]
    assert arguments["x-single-active-consumer"] is True
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-delivery-limit"] == Topology().delivery_limit
    partitions = Topology(partitions=DOCUMENTED_PARTITIONS)
    hidden = {partitions.commands_queue, partitions.partitions_exchange}
    assert not hidden & set(doc["channels"])
    assert not set(partitions.partition_queues()) & set(doc["channels"])


def test_the_single_queue_document_keeps_the_work_queue() -> None:
    """Rendered for ``partitions=0`` the command channel is the single work queue, without
    single active consumer (the layout of CONTRACT 1.1)."""
    from worker.contract.asyncapi import document
    from worker.settings import Topology

    single = document(Topology(partitions=0))
    assert "conference-worker.commands" in single["channels"]
    assert INTAKE not in single["channels"]
    arguments = single["channels"]["conference-worker.commands"]["x-arguments"]
    assert "x-single-active-consumer" not in arguments
    assert single["operations"]["conference-worker.commands"]["action"] == "receive"


def test_a_changed_subscriber_makes_the_document_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """schemas/ goes stale when the worker's subscriber changes (here: its description)."""
    from worker.app import broker

    monkeypatch.setattr(broker, "_SUBSCRIBER_TEXT", "Commands, differently described.")
    assert contract.stale(ROOT / "schemas") == [contract.ASYNCAPI]


def test_another_queue_makes_the_document_stale() -> None:
    """schemas/ goes stale when the subscriber's queue is another one."""
    from worker.contract.asyncapi import document
    from worker.settings import Topology

    other = contract.render(document(Topology(commands_queue="elsewhere.commands")))
    assert contract.stale(ROOT / "schemas", other) == [contract.ASYNCAPI]


# (c) the documents are well-formed --------------------------------------------------------------


def test_asyncapi_document_is_well_formed(doc: dict[str, Any]) -> None:
    """AsyncAPI 3.0.0 with info, channels, operations and components, and no YAML aliases."""
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"]
    assert doc["info"]["version"] == "1"
    assert {"channels", "operations", "components"} <= doc.keys()
    assert not re.search(r"[&*]id\d", contract.render()[contract.ASYNCAPI])


def test_every_asyncapi_ref_resolves(doc: dict[str, Any]) -> None:
    """Every $ref points inside the document, at something that exists."""
    found = list(refs(doc))
    assert found
    for ref in found:
        assert pointer(doc, ref) is not None, ref


def test_operations_use_messages_of_their_channel(doc: dict[str, Any]) -> None:
    """Each operation's messages are messages of the operation's own channel."""
    actions = {name: op["action"] for name, op in doc["operations"].items()}
    assert actions == {
        INTAKE: "receive",
        "conference.results": "send",
        "reply_to": "send",
        "conference.dead": "send",
    }
    for operation in doc["operations"].values():
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(f"{channel}/messages/")


def test_channel_addresses_declare_their_parameters(doc: dict[str, Any]) -> None:
    """Every {parameter} in a channel address is declared, and nothing else is."""
    for name, channel in doc["channels"].items():
        used = set(re.findall(r"{(\w+)}", channel["address"] or ""))
        assert used == set(channel.get("parameters", {})), name


def test_json_schema_files_are_valid_2020_12(schemas: dict[str, Any]) -> None:
    """Each file is a valid 2020-12 schema with $schema, $id, title, description; refs resolve."""
    for name, schema in schemas.items():
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == contract.BASE_URI + name
        assert schema["title"]
        assert schema["description"]
        for ref in refs(schema):
            assert pointer(schema, ref) is not None, f"{name}: {ref}"


def test_command_schema_is_a_discriminated_union(schemas: dict[str, Any]) -> None:
    """command.schema.json is oneOf the two commands, discriminated by type."""
    union = schemas["command.schema.json"]
    assert len(union["oneOf"]) == 2
    assert union["discriminator"]["propertyName"] == "type"
    for kind, ref in union["discriminator"]["mapping"].items():
        assert pointer(union, ref)["properties"]["type"]["const"] == kind


def test_schema_refuses_dot_segments_like_the_model(schemas: dict[str, Any]) -> None:
    """The published schema refuses the Telnyx conference ids '.' and '..' as the model does."""
    validator = Draft202012Validator(schemas["conference.supervisor_role.schema.json"])
    body = {"command_id": "c", "type": "conference.supervisor_role", "call_control_id": "v3:a"}
    body |= {"supervisor_role": "barge"}
    assert validator.is_valid(body | {"conference_id": "a"})
    assert not validator.is_valid(body | {"conference_id": ".."})


# (d) CONTRACT.md says the same thing -------------------------------------------------------------


@pytest.fixture(scope="module")
def contract_md() -> str:
    if not CONTRACT_MD.is_file():
        pytest.skip(f"CONTRACT.md not found at {CONTRACT_MD}")
    return CONTRACT_MD.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the first heading whose title starts with ``title``, up to the next heading."""
    for chunk in re.split(r"^#+ ", text, flags=re.MULTILINE)[1:]:
        if chunk.startswith(title):
            return chunk
    raise AssertionError(f"CONTRACT.md has no section {title!r}")


def table(text: str) -> dict[str, list[str]]:
    """Rows of the first markdown table in ``text``: each `name` of column 1 -> the cells."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or set(cells[0]) <= {"-", " "}:
            continue
        for name in ticked(cells[0]):
            rows[name] = cells
    return rows


def ticked(text: str) -> list[str]:
    """The `code` spans of a markdown text."""
    return re.findall(r"`([^`]+)`", text)


def quoted(text: str) -> set[str]:
    """The JSON strings of a markdown text (`"value"` spans), the values an enum lists."""
    return set(re.findall(r'`"([^"`]+)"`', text))


def enum(prop: dict[str, Any]) -> set[str]:
    """The enum or const of a property, looking through anyOf (optional fields)."""
    for option in [prop, *prop.get("anyOf", [])]:
        if "enum" in option or "const" in option:
            return set(option.get("enum", [option.get("const")]))
    raise AssertionError(f"no enum in {prop}")


def test_error_codes_match(contract_md: str, schemas: dict[str, Any]) -> None:
    """The error codes of the result schema are CONTRACT.md's "Error codes:" list."""
    listed = re.search(r"Error codes:(.*?)\n\n", contract_md, re.DOTALL)
    assert listed
    code = schemas["result-event.schema.json"]["$defs"]["ResultError"]["properties"]["code"]
    assert enum(code) == set(ticked(listed.group(1)))


def test_result_fields_and_statuses_match(contract_md: str, schemas: dict[str, Any]) -> None:
    """The result event has CONTRACT.md's fields, and its status the listed values."""
    rows = table(section(contract_md, "Result events"))
    properties = schemas["result-event.schema.json"]["properties"]
    assert set(properties) == set(rows)
    assert enum(properties["status"]) == quoted(rows["status"][1])


def test_command_types_match(contract_md: str, schemas: dict[str, Any]) -> None:
    """The command union's types are the ones CONTRACT.md lists for `type`."""
    rows = table(section(contract_md, "Commands"))
    mapping = schemas["command.schema.json"]["discriminator"]["mapping"]
    assert set(mapping) == quoted(rows["type"][1])


@pytest.mark.parametrize(
    ("kind", "enums"),
    [
        ("conference.update", ["mode"]),
        ("conference.supervisor_role", ["supervisor_role", "region"]),
    ],
)
def test_command_fields_match(
    contract_md: str, schemas: dict[str, Any], kind: str, enums: list[str]
) -> None:
    """Each command has CONTRACT.md's common and own fields, with the listed enum values."""
    common = table(section(contract_md, "Commands"))
    own = table(section(contract_md, f"`{kind}`"))
    properties = schemas[f"{kind}.schema.json"]["properties"]
    assert set(properties) == set(common) | set(own)
    assert enum(properties["type"]) == {kind}
    for field in enums:
        assert enum(properties[field]) == quoted(own[field][1]), field


def test_dead_letter_headers_match(contract_md: str, doc: dict[str, Any]) -> None:
    """The dead-letter headers the AsyncAPI document requires are the ones CONTRACT.md says every
    dead letter has; the replay's optional ones (since 1.2) are documented in both."""
    paragraphs = section(contract_md, "Dead letters").split("\n\n")
    (always,) = [p for p in paragraphs if "these headers" in p]
    (replayed,) = [p for p in paragraphs if "replayed" in p]
    required = {name for name in ticked(always) if name.startswith("x-")}
    optional = {name for name in ticked(replayed) if name.startswith("x-")}
    headers = doc["components"]["schemas"]["DeadLetterHeaders"]
    assert set(headers["anyOf"][0]["required"]) == required
    assert optional == {"x-replay-count", "x-replayed-at"}
    assert required | optional <= set(headers["properties"])


def test_topology_names_match(contract_md: str, doc: dict[str, Any]) -> None:
    """The exchanges and queues of the AsyncAPI channels are CONTRACT.md's topology table."""
    names = set()
    for channel in doc["channels"].values():
        amqp = channel["bindings"]["amqp"]
        names.add(amqp["queue"]["name"] if amqp["is"] == "queue" else amqp["exchange"].get("name"))
        names.add(channel.get("x-binding", {}).get("exchange"))  # a queue's exchange
    assert names - {"", None} == set(table(section(contract_md, "Topology")))
