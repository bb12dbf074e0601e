"""The Vinix conference documents of the sandbox's one account, saved the way Crossbar saves them.

``POST`` (:meth:`ConferenceStore.replace`) validates first, then checks that the numbers are
free, and only then looks the document up (so an invalid body on a missing id is a 400 and a
valid one a 404); every public field left out is dropped and the schema defaults come back.
``PATCH`` (:meth:`ConferenceStore.merge`) looks the document up first, deep-merges the request
into it (``null`` deletes a key) and validates the result.  Keys starting with ``_`` or ``pvt_``
are private: stripped from requests, never shown.  Each save bumps the CouchDB-style revision
``"<generation>-<32 hex>"``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from worker.sandbox.kazoo_schema import KazooSchema, copy_json

NUMBER_FIELDS = (("conference_numbers",), ("member", "numbers"), ("moderator", "numbers"))


@dataclass(frozen=True, slots=True)
class StoredConference:
    """A saved conference: its public fields and revision."""

    conference_id: str
    public: dict[str, Any]
    generation: int
    revision: str

    def data(self) -> dict[str, Any]:
        """What Crossbar answers: the public fields plus ``id``."""
        return {**self.public, "id": self.conference_id}


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a save was refused, as Kazoo says it: HTTP status, envelope ``message``, ``data``."""

    status: int
    message: str
    data: Any


def public_fields(document: dict[str, Any]) -> dict[str, Any]:
    """``kz_doc:public_fields``: the top-level keys that start neither with ``_`` nor ``pvt_``."""
    return {k: v for k, v in document.items() if not k.startswith(("_", "pvt_"))}


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``patch`` over ``base``, objects merged recursively; a ``null`` in ``patch`` deletes."""
    merged = dict(base)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict):
            current = merged.get(key)
            merged[key] = deep_merge(current if isinstance(current, dict) else {}, value)
        else:
            merged[key] = value
    return merged


def revision(generation: int, public: dict[str, Any]) -> str:
    """CouchDB's ``_rev`` shape: the generation and a digest of the content."""
    digest = hashlib.md5(orjson.dumps(public, option=orjson.OPT_SORT_KEYS), usedforsecurity=False)
    return f"{generation}-{digest.hexdigest()}"


def not_found(conference_id: str) -> Rejected:
    """Kazoo's ``bad_identifier`` system error for a missing document."""
    return Rejected(404, "bad_identifier", {"cause": conference_id, "message": "bad identifier"})


class ConferenceStore:
    """The conference documents of one account, with the account's number index."""

    def __init__(self, schema: KazooSchema, conference_ids: tuple[str, ...]) -> None:
        self.schema = schema
        self._docs: dict[str, StoredConference] = {}
        self._numbers: dict[str, str] = {}
        template = schema.validate({"profile": {"max-members": 10, "rate": 16000}}).value
        for index, conference_id in enumerate(conference_ids):
            public = {"name": f"Sandbox conference {index + 1}", **copy_json(template)}
            self._docs[conference_id] = StoredConference(
                conference_id, public, 1, revision(1, public)
            )

    def get(self, conference_id: str) -> StoredConference | None:
        """The saved document, or None."""
        return self._docs.get(conference_id)

    def documents(self) -> dict[str, dict[str, Any]]:
        """Every document's public fields, by conference id."""
        return {conf: stored.public for conf, stored in self._docs.items()}

    def replace(self, conference_id: str, data: dict[str, Any]) -> StoredConference | Rejected:
        """POST: validate, check numbers, then replace every public field."""
        checked = self.schema.validate_lenient(public_fields(data))
        if not checked.ok:
            return Rejected(400, "validation error", checked.errors())
        clash = self._numbers_in_use(conference_id, checked.value)
        if clash is not None:
            return clash
        current = self._docs.get(conference_id)
        if current is None:
            return not_found(conference_id)
        return self._save(current, checked.value)

    def merge(self, conference_id: str, data: dict[str, Any]) -> StoredConference | Rejected:
        """PATCH: load, deep-merge the request over the document, validate, save."""
        current = self._docs.get(conference_id)
        if current is None:
            return not_found(conference_id)
        checked = self.schema.validate_lenient(deep_merge(current.public, public_fields(data)))
        if not checked.ok:
            return Rejected(400, "validation error", checked.errors())
        clash = self._numbers_in_use(conference_id, checked.value)
        if clash is not None:
            return clash
        return self._save(current, checked.value)

    def _save(self, current: StoredConference, public: dict[str, Any]) -> StoredConference:
        conference_id = current.conference_id
        for number in _numbers(current.public):
            if self._numbers.get(number) == conference_id:
                del self._numbers[number]
        for number in _numbers(public):
            self._numbers[number] = conference_id
        generation = current.generation + 1
        saved = StoredConference(conference_id, public, generation, revision(generation, public))
        self._docs[conference_id] = saved
        return saved

    def _numbers_in_use(self, conference_id: str, public: dict[str, Any]) -> Rejected | None:
        """The 400 Crossbar gives when another conference of the account has these numbers."""
        owners = self._numbers
        taken = [n for n in _numbers(public) if owners.get(n, conference_id) != conference_id]
        if not taken:
            return None
        unique = {"message": "Numbers already in use", "cause": ",".join(taken)}
        return Rejected(400, "validation error", {"numbers": {"unique": unique}})


def _numbers(public: dict[str, Any]) -> list[str]:
    """The call-in numbers of a (valid) document, without repeats, in document order."""
    found: dict[str, None] = {}
    for path in NUMBER_FIELDS:
        value: Any = public
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        for number in value if isinstance(value, list) else ():
            if isinstance(number, str):
                found[number] = None
    return list(found)
