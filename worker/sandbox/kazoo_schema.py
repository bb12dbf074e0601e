"""Kazoo's JSON-schema validation, re-implemented for the sandbox (no ``jsonschema`` at runtime).

A small interpreter of the draft-04 subset that Kazoo's ``conferences`` and ``api_auth`` schemas
use, behaving like Kazoo's validator (jesse with ``allowed_errors: infinity`` and
``validator_options: [use_defaults, apply_defaults_to_empty_objects]``):

* every error is reported at once, as ``{"<dotted.path>": {"<rule>": {"message": ..., ...}}}``
  with Kazoo's own messages (``kz_json_schema:error_to_jobj``); literal dots in keys become
  ``%2E`` and array indexes are 0-based;
* a missing property whose schema has a ``default`` gets it, and an inserted ``{}`` default is
  filled with its own properties' defaults;
* :meth:`KazooSchema.validate_lenient` adds Crossbar's non-strict mode (``fix_js_types``): a
  value of the wrong type where an ``integer``, ``number`` or ``boolean`` is expected is
  converted when it can be (``"5"`` → 5, ``5.5`` → 6, ``"true"`` → true) and the document is
  validated again.

Keywords: ``type`` (also arrays of types), ``properties``, ``additionalProperties``, ``items``
(one schema), ``required``, ``minimum``/``maximum`` (and the draft-04 ``exclusive*`` flags),
``minItems``, ``maxItems``, ``uniqueItems``, ``pattern``, ``minLength``, ``maxLength``, ``enum``,
``oneOf`` and ``$ref`` to another loaded schema by its bare id (``"conferences.profile"``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

Path = tuple[str | int, ...]
KazooErrors = dict[str, dict[str, dict[str, Any]]]

SCHEMA_PACKAGE = "worker.sandbox"
MAX_FIX_ROUNDS = 8

_INT_TEXT = re.compile(r"^[+-]?[0-9]+$")
_FLOAT_TEXT = re.compile(r"^[+-]?[0-9]+\.[0-9]+([eE][+-]?[0-9]+)?$")


@dataclass(frozen=True, slots=True)
class Violation:
    """One failed rule: where, which rule, Kazoo's detail object and the schema's ``type``."""

    path: Path
    rule: str
    detail: dict[str, Any]
    schema_type: Any = None
    value: Any = None


@dataclass(slots=True)
class Validation:
    """The document with defaults inserted, and what was wrong with it."""

    value: Any
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no rule failed."""
        return not self.violations

    def errors(self) -> KazooErrors:
        """The violations as Kazoo's ``data`` object of a 400 ``validation error``."""
        out: KazooErrors = {}
        for violation in self.violations:
            out.setdefault(dotted(violation.path), {})[violation.rule] = violation.detail
        return out


def dotted(path: Path) -> str:
    """Kazoo's error key: segments joined with ``.``, literal dots escaped as ``%2E``."""
    return ".".join(str(part).replace(".", "%2E") for part in path)


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value (faster than :func:`copy.deepcopy` for plain data)."""
    if isinstance(value, dict):
        return {key: copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_json(item) for item in value]
    return value


def json_equal(left: Any, right: Any) -> bool:
    """JSON equality: ``1 == 1.0`` but ``true != 1``; objects and arrays compared deeply."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left is right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(json_equal, left, right))
    if type(left) is not type(right) and not (_is_number(left) and _is_number(right)):
        return False
    return bool(left == right)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
    "any": lambda v: True,
}


def is_type(value: Any, type_name: str) -> bool:
    """Whether ``value`` is of the JSON-schema primitive type ``type_name`` (draft 4 rules)."""
    check = _TYPE_CHECKS.get(type_name)
    return check(value) if check is not None else True


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


class KazooSchema:
    """One schema document plus the schemas its ``$ref`` may name."""

    def __init__(self, schema: Mapping[str, Any], refs: Mapping[str, Mapping[str, Any]]) -> None:
        self.schema = schema
        self._refs = refs
        self._defaults: dict[int, tuple[bool, Any]] = {}

    @classmethod
    def load(cls, name: str, *refs: str) -> KazooSchema:
        """The vendored schema ``name`` (e.g. ``"conferences"``) with the schemas in ``refs``."""
        return cls(load_schema_document(name), {ref: load_schema_document(ref) for ref in refs})

    def validate(self, document: Any) -> Validation:
        """Strict validation (``schema_strict_validation = true``) of a copy of ``document``."""
        value = copy_json(document)
        violations: list[Violation] = []
        value = self._check(value, self.schema, (), violations)
        return Validation(value, violations)

    def validate_lenient(self, document: Any) -> Validation:
        """Crossbar's default: fix what ``fix_js_types`` can fix and validate again."""
        current = copy_json(document)
        result = self.validate(current)
        for _ in range(MAX_FIX_ROUNDS):
            if result.ok or not _fix_types(current, result.violations):
                break
            result = self.validate(current)
        return result

    # The interpreter.  ``_check`` returns the value, with defaults inserted where they apply.

    def _check(
        self, value: Any, schema: Mapping[str, Any], path: Path, out: list[Violation]
    ) -> Any:
        at = _At(self, schema, path, out)
        for keyword, argument in schema.items():
            rule = _RULES.get(keyword)
            if rule is not None:
                rule(at, value, argument)
            elif keyword == "properties" and isinstance(value, dict):
                self._properties(value, argument, path, out)
            elif keyword == "items" and isinstance(value, list) and isinstance(argument, dict):
                for index, item in enumerate(value):
                    value[index] = self._check(item, argument, (*path, index), out)
            elif keyword == "$ref":
                value = self._check(value, self._refs[argument], path, out)
        return value

    def _properties(
        self, value: dict[str, Any], properties: Mapping[str, Any], path: Path, out: list[Violation]
    ) -> None:
        for name, subschema in properties.items():
            if name in value:
                value[name] = self._check(value[name], subschema, (*path, name), out)
            elif "default" in subschema:
                self._insert_default(value, name, subschema)

    def _insert_default(self, value: dict[str, Any], name: str, subschema: Any) -> None:
        """``use_defaults``: insert a default that is itself valid (filling ``{}`` recursively).

        The filled-in default of a subschema never changes, so it is computed once.
        """
        cached = self._defaults.get(id(subschema))
        if cached is None:
            scratch: list[Violation] = []
            default = self._check(copy_json(subschema["default"]), subschema, (), scratch)
            cached = self._defaults[id(subschema)] = (not scratch, default)
        valid, default = cached
        if valid:
            value[name] = copy_json(default)

    def matches(self, value: Any, schema: Mapping[str, Any]) -> bool:
        """Whether ``value`` is valid against ``schema`` (``value`` itself is left untouched)."""
        scratch: list[Violation] = []
        self._check(copy_json(value), schema, (), scratch)
        return not scratch


@dataclass(slots=True)
class _At:
    """Where a rule is checked: the validator, the (sub)schema, the path, the violations."""

    validator: KazooSchema
    schema: Mapping[str, Any]
    path: Path
    out: list[Violation]

    def fail(
        self, rule: str, value: Any, message: str, *, key: str | None = None, **extra: Any
    ) -> None:
        """Record a violation of ``rule`` (at the property ``key`` below the path, if given)."""
        path = self.path if key is None else (*self.path, key)
        detail = {"message": message, **extra, "value": value}
        self.out.append(Violation(path, rule, detail, self.schema.get("type"), value))


def _type_rule(at: _At, value: Any, types: Any) -> None:
    if isinstance(types, str):
        if is_type(value, types):
            return
        target = types
    elif any(is_type(value, name) for name in types):
        return
    else:
        target = ", ".join(types)
    at.fail("type", value, f"Value did not match type(s): {target}", target=target)


def _additional(at: _At, value: Any, allowed: Any) -> None:
    if allowed is not False or not isinstance(value, dict):
        return
    known = at.schema.get("properties", {})
    message = "Strict checking of data is enabled; only include schema-defined properties"
    for name in value:
        if name not in known:
            at.fail("additionalProperties", value, message, key=name)


def _required(at: _At, value: Any, names: Any) -> None:
    if isinstance(value, dict):
        for name in names:
            if name not in value:
                at.fail("required", value, "Field is required but missing", key=name)


def _minimum(at: _At, value: Any, limit: Any) -> None:
    exclusive = at.schema.get("exclusiveMinimum") is True
    if _is_number(value) and (value < limit or (exclusive and value == limit)):
        at.fail("minimum", value, f"Value must be at least {limit}", target=limit)


def _maximum(at: _At, value: Any, limit: Any) -> None:
    exclusive = at.schema.get("exclusiveMaximum") is True
    if _is_number(value) and (value > limit or (exclusive and value == limit)):
        at.fail("maximum", value, f"Value must be at most {limit}", target=limit)


def _min_items(at: _At, value: Any, limit: Any) -> None:
    if isinstance(value, list) and len(value) < limit:
        at.fail("minItems", value, f"The list must have at least {limit} items", target=limit)


def _max_items(at: _At, value: Any, limit: Any) -> None:
    if isinstance(value, list) and len(value) > limit:
        at.fail("maxItems", value, f"The list is more than {limit} items", target=limit)


def _unique(at: _At, value: Any, wanted: Any) -> None:
    if wanted is not True or not isinstance(value, list):
        return
    for index, item in enumerate(value):
        if any(json_equal(item, other) for other in value[index + 1 :]):
            at.fail("uniqueItems", value, "List of items is not unique")
            return


def _pattern(at: _At, value: Any, pattern: Any) -> None:
    if isinstance(value, str) and _regex(pattern).search(value) is None:
        at.fail("pattern", value, f"Failed to match pattern '{pattern}'", target=pattern)


def _min_length(at: _At, value: Any, limit: Any) -> None:
    if isinstance(value, str) and len(value) < limit:
        text = f"String must be at least {limit} characters"
        at.fail("minLength", value, text, target=limit, cause=value)


def _max_length(at: _At, value: Any, limit: Any) -> None:
    if isinstance(value, str) and len(value) > limit:
        text = f"String must not be more than {limit} characters"
        at.fail("maxLength", value, text, target=limit, cause=value)


def _enum(at: _At, value: Any, options: Any) -> None:
    if not any(json_equal(value, option) for option in options):
        text = "Value not found in enumerated list of values"
        at.fail("enum", value, text, target=options)


def _one_of(at: _At, value: Any, options: Any) -> None:
    if sum(at.validator.matches(value, option) for option in options) != 1:
        at.fail("not_one_schema_valid", value, "failed to validate")


_RULES: dict[str, Callable[[_At, Any, Any], None]] = {
    "type": _type_rule,
    "additionalProperties": _additional,
    "required": _required,
    "minimum": _minimum,
    "maximum": _maximum,
    "minItems": _min_items,
    "maxItems": _max_items,
    "uniqueItems": _unique,
    "pattern": _pattern,
    "minLength": _min_length,
    "maxLength": _max_length,
    "enum": _enum,
    "oneOf": _one_of,
}


# Non-strict mode: kz_json_schema:fix_js_types/2 and kz_term:to_integer|to_number|to_boolean.


def _fix_types(document: Any, violations: list[Violation]) -> bool:
    """Convert, in ``document``, the wrongly typed values that Kazoo can convert."""
    fixed = False
    for violation in violations:
        if violation.rule != "type" or not violation.path:
            continue
        kind = violation.schema_type
        convert = _CONVERTERS.get(kind) if isinstance(kind, str) else None
        converted = convert(violation.value) if convert is not None else None
        if converted is not None:
            _set_path(document, violation.path, converted)
            fixed = True
    return fixed


def _erlang_round(number: float) -> int | None:
    """Erlang's ``round/1`` (half away from zero); None for infinities."""
    if not math.isfinite(number):
        return None
    return int(math.copysign(math.floor(abs(number) + 0.5), number))


def _to_integer(value: Any) -> int | None:
    if isinstance(value, float):
        return _erlang_round(value)
    if isinstance(value, str) and _INT_TEXT.match(value):
        return int(value)
    if isinstance(value, str) and _FLOAT_TEXT.match(value):
        return _erlang_round(float(value))
    return None


def _to_number(value: Any) -> int | float | None:
    if isinstance(value, str) and _INT_TEXT.match(value):
        return int(value)
    if isinstance(value, str) and _FLOAT_TEXT.match(value):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _to_boolean(value: Any) -> bool | None:
    return {"true": True, "false": False}.get(value) if isinstance(value, str) else None


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "integer": _to_integer,
    "number": _to_number,
    "boolean": _to_boolean,
}


def _set_path(document: Any, path: Path, value: Any) -> None:
    target = document
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


def load_schema_document(name: str) -> dict[str, Any]:
    """The vendored Kazoo schema ``name`` (package data of :mod:`worker.sandbox`)."""
    text = resources.files(SCHEMA_PACKAGE).joinpath("schemas", f"{name}.json").read_text("utf-8")
    document: dict[str, Any] = json.loads(text)
    return document
