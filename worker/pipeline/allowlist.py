"""The publisher allow-list: which AMQP user may change which accounts and conferences.

RabbitMQ refuses a message whose ``user_id`` property differs from the user that authenticated the
connection (unless that user has the ``impersonator`` tag), so ``user_id`` says who published a
command.  With an allow-list configured, every command must carry a ``user_id`` listed here, and
its target must be one that user is granted; anything else is :class:`Forbidden` (``rejected``,
dead-lettered, never sent to a provider).

The file (JSON, or YAML for ``.yaml``/``.yml``)::

    {"publishers": {
        "billing-svc": {"vinix_accounts": ["<account_id>"],
                        "vinix_conferences": ["<conference_id>"],    # optional: default all
                        "telnyx_conferences": ["<conference id or name>"]},
        "ops-console": {"vinix_accounts": ["*"], "telnyx_conferences": ["*"]}}}

``"*"`` grants every id of that kind.  Ids are matched exactly as sent: no case folding, no
dash removal.  A spelling that is not listed is refused (fail closed), because we cannot know
that the provider maps two spellings to the same resource.  Unknown keys, empty ids and a
malformed file are refused when the file is loaded, so a typo never silently grants nothing or
everything.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from worker.contract.messages import ConferenceUpdate, SupervisorRoleChange
from worker.errors import PermanentError

ANY = "*"
_MAX_ECHO = 100  # longest user id / target id quoted in a message


class Forbidden(PermanentError):
    """The publisher (AMQP ``user_id``) may not act on the command's target."""

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__("forbidden", message, details=details)


class AllowListError(ValueError):
    """The allow-list file is missing, unreadable or malformed (the worker must not start)."""


Id = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    vinix_accounts: list[Id] = []
    vinix_conferences: list[Id] | None = None
    telnyx_conferences: list[Id] = []


class _Document(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    publishers: dict[Annotated[str, StringConstraints(min_length=1, max_length=255)], _Entry]


@dataclass(frozen=True, slots=True)
class Grant:
    """What one publisher may change; ``None`` for ``vinix_conferences`` means "all"."""

    vinix_accounts: frozenset[str] = frozenset()
    vinix_conferences: frozenset[str] | None = None
    telnyx_conferences: frozenset[str] = frozenset()

    def allows_vinix(self, account_id: str, conference_id: str) -> bool:
        """True when both the account and the conference are granted."""
        if not _granted(self.vinix_accounts, account_id):
            return False
        return self.vinix_conferences is None or _granted(self.vinix_conferences, conference_id)

    def allows_telnyx(self, conference_id: str) -> bool:
        """True when the Telnyx conference is granted."""
        return _granted(self.telnyx_conferences, conference_id)


def _granted(ids: frozenset[str], wanted: str) -> bool:
    return ANY in ids or wanted in ids


class AllowList:
    """Publishers (AMQP user ids) and what each may change."""

    def __init__(self, publishers: Mapping[str, Grant]) -> None:
        self._publishers = dict(publishers)

    @classmethod
    def from_document(cls, document: Any) -> AllowList:
        """Build from the parsed file; :class:`AllowListError` when it is malformed."""
        try:
            parsed = _Document.model_validate(document)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(document)'}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)[:5]
            )
            raise AllowListError(f"invalid allow-list: {problems}") from None
        return cls(
            {
                user: Grant(
                    frozenset(entry.vinix_accounts),
                    None if entry.vinix_conferences is None else frozenset(entry.vinix_conferences),
                    frozenset(entry.telnyx_conferences),
                )
                for user, entry in parsed.publishers.items()
            }
        )

    @classmethod
    def from_file(cls, path: str | Path) -> AllowList:
        """Load a JSON (or ``.yaml``/``.yml``) allow-list file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AllowListError(f"cannot read the allow-list {path}: {exc}") from None
        try:
            if path.suffix.lower() in {".yaml", ".yml"}:
                document = yaml.safe_load(text)
            else:
                document = json.loads(text)
        except (ValueError, RecursionError, yaml.YAMLError) as exc:
            raise AllowListError(f"cannot parse the allow-list {path}: {exc}") from None
        return cls.from_document(document)

    @property
    def publishers(self) -> frozenset[str]:
        """The user ids that may publish at all."""
        return frozenset(self._publishers)

    def check(self, user_id: str | None, command: ConferenceUpdate | SupervisorRoleChange) -> None:
        """Return if ``user_id`` may carry out ``command``; raise :class:`Forbidden` otherwise."""
        target = _target(command)
        details = {"user_id": _short(user_id), **target}
        if not user_id:
            raise Forbidden(
                f"the command has no AMQP user_id; only listed publishers may change "
                f"{_describe(target)}",
                details=details,
            )
        grant = self._publishers.get(user_id)
        if grant is None:
            raise Forbidden(
                f"publisher {_quote(user_id)} is not on the allow-list", details=details
            )
        if isinstance(command, ConferenceUpdate):
            allowed = grant.allows_vinix(command.account_id, command.conference_id)
        else:
            allowed = grant.allows_telnyx(command.conference_id)
        if not allowed:
            raise Forbidden(
                f"publisher {_quote(user_id)} may not change {_describe(target)}", details=details
            )


def _target(command: ConferenceUpdate | SupervisorRoleChange) -> dict[str, str | None]:
    if isinstance(command, ConferenceUpdate):
        return {
            "provider": "vinix",
            "account_id": command.account_id,
            "conference_id": command.conference_id,
        }
    return {
        "provider": "telnyx",
        "account_id": None,
        "conference_id": _short(command.conference_id),
    }


def _describe(target: Mapping[str, str | None]) -> str:
    conference = _quote(target["conference_id"] or "")
    if target["provider"] == "vinix":
        return f"vinix account {_quote(target['account_id'] or '')} conference {conference}"
    return f"telnyx conference {conference}"


def _short(value: str | None) -> str | None:
    return None if value is None else value[:_MAX_ECHO]


def _quote(value: str) -> str:
    """``value`` shortened and quoted with escapes, so control characters cannot forge log lines."""
    short = value[:_MAX_ECHO]
    return repr(short) + ("…" if len(value) > _MAX_ECHO else "")
