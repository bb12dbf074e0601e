"""The worker's ConferenceDocument agrees with the real Kazoo ``conferences`` schema.

The Draft 4 schemas of 2600hz/kazoo live in ``shared/fixtures/kazoo`` beside the repository.
Hypothesis draws documents that Kazoo's schema accepts (the model must accept them and send them
on unchanged) and documents mutated in ways Kazoo cannot coerce (both must refuse them).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from jsonschema import Draft4Validator
from pydantic import ValidationError
from referencing import Registry
from referencing.jsonschema import DRAFT4

from worker.contract.conference import ConferenceDocument
from worker.contract.messages import ConferenceUpdate

KAZOO = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "kazoo"
pytestmark = pytest.mark.skipif(
    not (KAZOO / "conferences.json").is_file(), reason=f"no Kazoo schema fixtures in {KAZOO}"
)
PROFILE_URI = "conferences.profile"  # how conferences.json refers to it
EXAMPLES = settings(max_examples=200, deadline=None)


@functools.cache
def kazoo() -> tuple[dict[str, Any], Registry[Any], Draft4Validator]:
    """The conferences schema, a registry holding conferences.profile, and a validator."""
    schema = json.loads((KAZOO / "conferences.json").read_text(encoding="utf-8"))
    profile = json.loads((KAZOO / "conferences.profile.json").read_text(encoding="utf-8"))
    registry: Registry[Any] = Registry().with_resource(PROFILE_URI, DRAFT4.create_resource(profile))
    return schema, registry, Draft4Validator(schema, registry=registry)


def kazoo_accepts(doc: Any) -> bool:
    return kazoo()[2].is_valid(doc)


def model_accepts(doc: Any) -> bool:
    try:
        ConferenceDocument.model_validate_json(json.dumps(doc))
    except ValidationError:
        return False
    return True


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in schema:
        return schema
    resolved: dict[str, Any] = kazoo()[1].resolver().lookup(schema["$ref"]).contents
    return resolved


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)
DIGITS = st.from_regex(r"\A[0-9]{1,6}\Z")
NOT_DIGITS = st.text(max_size=6).filter(lambda s: not re.fullmatch(r"[0-9]+\n?", s))
CONTAINERS = st.dictionaries(st.text(max_size=4), SCALARS, max_size=2) | st.lists(SCALARS)


def valid(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Instances of a Kazoo schema, unknown keys included.

    hypothesis_jsonschema draws the leaves; objects are composed here because its own object
    strategy fails with current Hypothesis ("'many' object has no attribute 'more'").
    """
    schema = resolve(schema)
    if schema.get("type") != "object":
        return from_schema(schema)
    known = schema.get("properties", {})
    fields = st.fixed_dictionaries({}, optional={key: valid(sub) for key, sub in known.items()})
    extra = st.dictionaries(st.text(max_size=12).filter(lambda k: k not in known), JSON, max_size=2)
    return st.builds(lambda more, doc: more | doc, extra, fields)


def leaves(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, schema) of every declared non-object field, profile included."""
    found = []
    for key, sub in resolve(schema).get("properties", {}).items():
        if resolve(sub).get("type") == "object" and "properties" in resolve(sub):
            found.extend(leaves(sub, (*path, key)))
        elif sub.get("type") != "object":
            found.append(((*path, key), sub))
    return found


def with_value(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(doc)
    target = changed
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return changed


def out_of_range(low: int, high: int | None) -> st.SearchStrategy[int]:
    below = st.integers(max_value=low - 1)
    return below if high is None else below | st.integers(min_value=high + 1)


def wrong_type(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A value of a JSON type the field cannot take, and that Kazoo cannot coerce."""
    if schema.get("type") == "array":
        return st.dictionaries(st.text(max_size=4), SCALARS, max_size=2)
    return CONTAINERS


UNIQUE = [("conference_numbers",), ("member", "numbers"), ("moderator", "numbers")]
DIGIT_LISTS = [*UNIQUE, ("member", "pins"), ("moderator", "pins")]
RANGES: dict[str, tuple[int, int | None]] = {
    "comfort-noise": (0, 10000),
    "energy-level": (0, 1800),
    "interval": (10, 120),
    "max-members": (2, None),
}


def mutations() -> st.SearchStrategy[tuple[tuple[str, ...], Any]]:
    """(path, value) pairs that no Kazoo conference may hold."""
    rates = resolve(kazoo()[0]["properties"]["profile"])["properties"]["rate"]["enum"]
    good = st.lists(DIGITS, min_size=1, max_size=3, unique=True)
    return st.one_of(
        st.sampled_from(sorted(RANGES.items())).flatmap(
            lambda item: st.tuples(st.just(("profile", item[0])), out_of_range(*item[1]))
        ),
        st.tuples(st.just(("profile", "rate")), st.integers().filter(lambda n: n not in rates)),
        st.tuples(st.sampled_from(DIGIT_LISTS), st.builds(lambda g, b: [*g, b], good, NOT_DIGITS)),
        st.tuples(st.sampled_from(UNIQUE), good.map(lambda numbers: [*numbers, numbers[0]])),
        st.tuples(st.just(("name",)), st.just("") | st.text(min_size=129, max_size=160)),
        st.tuples(st.just(("owner_id",)), st.text(max_size=31) | st.text(min_size=33, max_size=40)),
        st.sampled_from(leaves(kazoo()[0])).flatmap(
            lambda leaf: st.tuples(st.just(leaf[0]), wrong_type(leaf[1]))
        ),
    )


@EXAMPLES
@given(st.deferred(lambda: valid(kazoo()[0])))
def test_documents_kazoo_accepts_are_accepted_unchanged(doc: dict[str, Any]) -> None:
    """Every document valid for Kazoo's schema is accepted and sent to Vinix as it came, except
    integers beyond 64 bits, which the worker refuses on purpose (orjson cannot hold them)."""
    assert kazoo_accepts(doc), "the generator must only draw valid documents"
    assume(fits_64_bits(doc))
    assert ConferenceDocument.model_validate_json(json.dumps(doc)).to_wire() == doc


def fits_64_bits(value: Any) -> bool:
    if isinstance(value, dict):
        return all(fits_64_bits(v) for v in value.values())
    if isinstance(value, list):
        return all(fits_64_bits(v) for v in value)
    return not isinstance(value, int) or -(2**63) <= value < 2**64


@EXAMPLES
@given(st.deferred(lambda: valid(kazoo()[0])), st.deferred(mutations))
def test_documents_kazoo_refuses_are_refused(doc: dict[str, Any], change: Any) -> None:
    """Out-of-range numbers, bad digits, duplicates, bad lengths, wrong types: both refuse."""
    bad = with_value(doc, *change)
    assert not kazoo_accepts(bad), f"the mutation {change!r} must be invalid for Kazoo"
    assert not model_accepts(bad)


def test_profile_reference_resolves_to_the_profile_schema() -> None:
    """The registry serves conferences.profile, so profile limits are really checked."""
    assert kazoo_accepts({"profile": {"interval": 20}})
    assert not kazoo_accepts({"profile": {"interval": 5}})
    assert not kazoo_accepts({"profile": {"rate": 8001}})


@pytest.mark.parametrize(
    "doc",
    [{"max_participants": "5"}, {"play_name": "true"}, {"profile": {"energy-level": "20"}}],
)
def test_kazoo_style_coercion_is_the_one_leniency(doc: dict[str, Any]) -> None:
    """Kazoo's schema refuses "5" and "true" but Kazoo coerces them; so does the model."""
    assert not kazoo_accepts(doc)
    assert model_accepts(doc)


@pytest.mark.parametrize(
    "doc",
    [
        {"profile": {"max_members": "x"}},
        {"profile": {"energy_level": -5}},
        {"profile": {"max_members": 5}},
    ],
)
def test_underscore_spellings_of_profile_keys_are_refused(doc: dict[str, Any]) -> None:
    """Kazoo would silently ignore ``max_members``; the worker refuses it (on purpose)."""
    assert kazoo_accepts(doc)
    assert not model_accepts(doc)


def test_unknown_profile_keys_are_kept_as_sent() -> None:
    """Keys Kazoo does not know are forwarded untouched."""
    doc = {"profile": {"max-members": 5, "custom-sound": "x", "n": None}}
    assert ConferenceDocument.model_validate_json(json.dumps(doc)).to_wire() == doc


def test_boolean_is_not_an_integer() -> None:
    """Kazoo refuses true for an integer field and cannot coerce it, so the model must too."""
    assert not kazoo_accepts({"max_participants": True})
    assert not model_accepts({"max_participants": True})


@pytest.mark.parametrize("conference", [{"custom": None}, {"controls": {"digit-1": None}}])
def test_replace_accepts_nulls_that_kazoo_accepts(conference: dict[str, Any]) -> None:
    """null in an unknown key or a free-form object is valid for Kazoo, so also in replace mode."""
    assert kazoo_accepts(conference)
    body = {"command_id": "c", "type": "conference.update", "conference": conference}
    body |= {"account_id": "a" * 32, "conference_id": "b" * 32}
    ConferenceUpdate.model_validate_json(json.dumps(body))
