"""The sandbox's Kazoo validator against the reference draft-04 validator, and Kazoo's messages."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft4Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from worker.sandbox.kazoo_schema import KazooSchema, dotted, load_schema_document

CONFERENCES = load_schema_document("conferences")
PROFILE = load_schema_document("conferences.profile")
API_AUTH = load_schema_document("api_auth")
REFS = {"conferences.profile": PROFILE}

KAZOO = KazooSchema.load("conferences", "conferences.profile")
KAZOO_AUTH = KazooSchema.load("api_auth")
REGISTRY: Registry[Any] = Registry().with_resource(
    "conferences.profile", Resource.from_contents(PROFILE, default_specification=DRAFT4)
)
REFERENCE = Draft4Validator(CONFERENCES, registry=REGISTRY)
REFERENCE_AUTH = Draft4Validator(API_AUTH)

HYPOTHESIS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
ANY_JSON = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def valid_documents(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Valid instances of ``schema``: leaves from ``hypothesis_jsonschema.from_schema``.

    Objects are assembled here because the installed hypothesis-jsonschema (0.23.1) cannot draw
    objects with this Hypothesis version (``'many' object has no attribute 'more'``).
    """
    if "$ref" in schema:
        return valid_documents({**REFS[schema["$ref"]], "type": "object"})
    if schema.get("type") != "object":
        return from_schema(schema)
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    fields = {name: valid_documents(sub) for name, sub in properties.items()}
    known = st.fixed_dictionaries(
        {k: v for k, v in fields.items() if k in required},
        optional={k: v for k, v in fields.items() if k not in required},
    )
    if schema.get("additionalProperties") is False:
        return known
    extra_keys = st.text(max_size=8).filter(lambda key: key not in properties)
    extras = st.dictionaries(extra_keys, ANY_JSON, max_size=2)
    return st.tuples(extras, known).map(lambda pair: {**pair[0], **pair[1]})


def reference_errors(validator: Draft4Validator, document: Any) -> set[tuple[str, str]]:
    """``(dotted path, Kazoo rule)`` of every error the reference validator finds."""
    found: set[tuple[str, str]] = set()
    for error in validator.iter_errors(document):
        path = tuple(error.absolute_path)
        if error.validator == "required":
            missing = [name for name in error.validator_value if name not in error.instance]
            found.update((dotted((*path, name)), "required") for name in missing)
        elif error.validator == "additionalProperties":
            known = error.schema.get("properties", {})
            extra = [name for name in error.instance if name not in known]
            found.update((dotted((*path, name)), "additionalProperties") for name in extra)
        elif error.validator == "oneOf":
            found.add((dotted(path), "not_one_schema_valid"))
        else:
            found.add((dotted(path), str(error.validator)))
    return found


def kazoo_errors(errors: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
    """``(dotted path, rule)`` of a Kazoo ``validation error`` data object."""
    return {(path, rule) for path, rules in errors.items() for rule in rules}


# Mutations that make a valid conference invalid in a way Kazoo cannot coerce away.
NOT_COERCIBLE: dict[str, st.SearchStrategy[Any]] = {
    "string": st.sampled_from([5, 1.5, True, None, [], {}]),
    "integer": st.sampled_from(["abc", "1e3", "1.5.5", True, None, [], {}]),
    "boolean": st.sampled_from(["yes", "TRUE", 1, 0, None, [], {}]),
    "array": st.sampled_from(["x", 3, True, None, {}]),
    "object": st.sampled_from(["x", 3, True, None, []]),
}
TYPED_FIELDS = {
    ("name",): "string",
    ("owner_id",): "string",
    ("max_participants",): "integer",
    ("play_name",): "boolean",
    ("conference_numbers",): "array",
    ("controls",): "object",
    ("member",): "object",
    ("member", "join_muted"): "boolean",
    ("member", "numbers"): "array",
    ("moderator", "pins"): "array",
    ("profile",): "object",
    ("profile", "interval"): "integer",
    ("profile", "rate"): "integer",
    ("profile", "alone-sound"): "string",
}
BAD_VALUES: list[tuple[tuple[str, ...], st.SearchStrategy[Any]]] = [
    *((path, NOT_COERCIBLE[kind]) for path, kind in TYPED_FIELDS.items()),
    (("profile", "interval"), st.sampled_from([0, 9, 121, -5])),
    (("profile", "comfort-noise"), st.sampled_from([-1, 10001])),
    (("profile", "energy-level"), st.sampled_from([-1, 1801])),
    (("profile", "max-members"), st.sampled_from([1, 0, -3])),
    (("profile", "rate"), st.sampled_from([11025, 0, 8001])),
    (("conference_numbers",), st.sampled_from([["12a"], ["1", "1"], ["1", 2]])),
    (("member", "numbers"), st.sampled_from([["+1"], ["12", "12"]])),
    (("member", "pins"), st.sampled_from([["x"], [""]])),
    (("moderator", "numbers"), st.sampled_from([["7", "7"], ["1 2"]])),
    (("name",), st.sampled_from(["", "x" * 129])),
    (("owner_id",), st.sampled_from(["a" * 31, "a" * 33])),
    (("play_entry_tone",), st.sampled_from([5, None, []])),
    (("play_exit_tone",), st.sampled_from([1.5, {}])),
]
MUTATION = st.one_of(*(st.tuples(st.just(path), values) for path, values in BAD_VALUES))


def mutate(document: dict[str, Any], path: tuple[str, ...], value: Any) -> bool:
    """Set ``path`` to ``value`` (creating missing objects); False if a parent is not an object."""
    target: Any = document
    for key in path[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            return False
    target[path[-1]] = value
    return True


@HYPOTHESIS
@given(valid_documents(CONFERENCES))
def test_generated_valid_conferences_are_valid_for_both(document: dict[str, Any]) -> None:
    """A document the reference validator accepts is accepted, and stays valid with defaults."""
    assert REFERENCE.is_valid(document)
    result = KAZOO.validate(document)
    assert result.errors() == {}
    assert REFERENCE.is_valid(result.value)
    assert KAZOO.validate_lenient(document).value == result.value


@HYPOTHESIS
@given(valid_documents(CONFERENCES), st.lists(MUTATION, min_size=1, max_size=4))
def test_generated_invalid_conferences_get_the_same_errors(
    document: dict[str, Any], mutations: list[tuple[tuple[str, ...], Any]]
) -> None:
    """Invalid documents fail both validators at the same paths by the same rules (lenient too)."""
    applied = [mutate(document, path, value) for path, value in mutations]
    expected = reference_errors(REFERENCE, document)
    assume(any(applied) and expected)
    assert kazoo_errors(KAZOO.validate(document).errors()) == expected
    assert kazoo_errors(KAZOO.validate_lenient(document).errors()) == expected


@HYPOTHESIS
@given(valid_documents(API_AUTH) | st.dictionaries(st.text(max_size=70), ANY_JSON, max_size=3))
def test_api_auth_agrees_with_the_reference(document: dict[str, Any]) -> None:
    """``api_auth`` (required key, exact length, no other keys) agrees with the reference."""
    result = KAZOO_AUTH.validate(document)
    assert kazoo_errors(result.errors()) == reference_errors(REFERENCE_AUTH, document)
    assert result.ok == REFERENCE_AUTH.is_valid(document)


def test_defaults_are_inserted_like_kazoo() -> None:
    """``{}`` gets Kazoo's defaults: member/moderator objects filled, numbers, play_name."""
    assert KAZOO.validate({}).value == {
        "conference_numbers": [],
        "member": {"join_deaf": False, "join_muted": True, "numbers": [], "pins": []},
        "moderator": {"join_deaf": False, "join_muted": False, "numbers": [], "pins": []},
        "play_name": False,
    }


def test_defaults_fill_a_partial_object_without_overwriting() -> None:
    """A given ``member`` keeps its values and gets the missing defaults."""
    member = KAZOO.validate({"member": {"join_muted": False, "numbers": ["1"]}}).value["member"]
    assert member == {"join_muted": False, "numbers": ["1"], "join_deaf": False, "pins": []}


def test_validate_does_not_touch_its_argument() -> None:
    """The caller's document is copied, not filled in place."""
    document: dict[str, Any] = {"member": {}}
    KAZOO.validate(document)
    assert document == {"member": {}}


@pytest.mark.parametrize(
    ("document", "key", "rule", "detail"),
    [
        (
            {"name": "x" * 129},
            "name",
            "maxLength",
            {
                "message": "String must not be more than 128 characters",
                "target": 128,
                "cause": "x" * 129,
                "value": "x" * 129,
            },
        ),
        (
            {"name": ""},
            "name",
            "minLength",
            {
                "message": "String must be at least 1 characters",
                "target": 1,
                "cause": "",
                "value": "",
            },
        ),
        (
            {"profile": {"rate": 11025}},
            "profile.rate",
            "enum",
            {
                "message": "Value not found in enumerated list of values",
                "target": [8000, 12000, 16000, 24000, 32000, 44100, 48000],
                "value": 11025,
            },
        ),
        (
            {"profile": {"interval": 5}},
            "profile.interval",
            "minimum",
            {"message": "Value must be at least 10", "target": 10, "value": 5},
        ),
        (
            {"profile": {"energy-level": 1801}},
            "profile.energy-level",
            "maximum",
            {"message": "Value must be at most 1800", "target": 1800, "value": 1801},
        ),
        (
            {"play_name": "yes"},
            "play_name",
            "type",
            {
                "message": "Value did not match type(s): boolean",
                "target": "boolean",
                "value": "yes",
            },
        ),
        (
            {"conference_numbers": ["12a"]},
            "conference_numbers.0",
            "pattern",
            {"message": "Failed to match pattern '^[0-9]+$'", "target": "^[0-9]+$", "value": "12a"},
        ),
        (
            {"member": {"numbers": ["1", "1"]}},
            "member.numbers",
            "uniqueItems",
            {"message": "List of items is not unique", "value": ["1", "1"]},
        ),
        (
            {"play_entry_tone": 5},
            "play_entry_tone",
            "not_one_schema_valid",
            {"message": "failed to validate", "value": 5},
        ),
    ],
)
def test_kazoo_messages(document: dict[str, Any], key: str, rule: str, detail: Any) -> None:
    """Each rule produces Kazoo's exact error object under the dotted key."""
    assert KAZOO.validate_lenient(document).errors() == {key: {rule: detail}}


STRICT_MESSAGE = "Strict checking of data is enabled; only include schema-defined properties"


def test_api_auth_messages() -> None:
    """Missing ``api_key`` and unknown keys (dots escaped as %2E) get Kazoo's messages."""
    errors = KAZOO_AUTH.validate({"a.b": 1}).errors()
    assert errors == {
        "a%2Eb": {
            "additionalProperties": {
                "message": STRICT_MESSAGE,
                "value": {"a.b": 1},
            }
        },
        "api_key": {"required": {"message": "Field is required but missing", "value": {"a.b": 1}}},
    }


def test_all_errors_are_reported_at_once() -> None:
    """Several problems give several keys in one answer."""
    errors = KAZOO.validate({"name": "", "profile": {"rate": 1, "interval": 500}, "flags": "x"})
    assert set(errors.errors()) == {"name", "profile.rate", "profile.interval", "flags"}


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ({"max_participants": "5"}, {"max_participants": 5}),
        ({"max_participants": "+7"}, {"max_participants": 7}),
        ({"max_participants": "5.5"}, {"max_participants": 6}),
        ({"max_participants": 2.5}, {"max_participants": 3}),
        ({"max_participants": -2.5}, {"max_participants": -3}),
        (
            {"play_name": "true", "play_welcome": "false"},
            {"play_name": True, "play_welcome": False},
        ),
        ({"profile": {"interval": "20"}}, {"profile": {"interval": 20}}),
        ({"member": {"join_muted": "false"}}, {"member": {"join_muted": False}}),
    ],
)
def test_non_strict_mode_coerces_strings_and_floats(given: Any, stored: Any) -> None:
    """Crossbar's fix_js_types: integer/boolean fields given as strings or floats are converted."""
    result = KAZOO.validate_lenient(given)
    assert result.ok
    for key, value in stored.items():
        if isinstance(value, dict):
            assert result.value[key].items() >= value.items()
        else:
            assert result.value[key] == value


@pytest.mark.parametrize("value", ["1e3", "five", "TRUE", True, None, []])
def test_non_strict_mode_rejects_what_cannot_be_converted(value: Any) -> None:
    """Values Kazoo cannot convert are still type errors."""
    errors = KAZOO.validate_lenient({"max_participants": value}).errors()
    assert errors["max_participants"]["type"]["value"] == value


def test_coerced_values_are_validated_again() -> None:
    """``"5"`` for ``profile.interval`` becomes 5 and then fails the minimum of 10."""
    errors = KAZOO.validate_lenient({"profile": {"interval": "5"}}).errors()
    assert errors == {
        "profile.interval": {
            "minimum": {"message": "Value must be at least 10", "target": 10, "value": 5}
        }
    }
