"""The wire contract (CONTRACT.md, version 1): the two commands and the result event.

These models are the single source of the JSON Schemas and the AsyncAPI document in
``schemas/`` (see :mod:`worker.contract.schemas`).  Commands are strict: unknown top-level
fields and wrong JSON types are rejected.  The Vinix ``conference`` document follows Kazoo's
own, more lenient rules (:mod:`worker.contract.conference`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from worker.contract.conference import ConferenceDocument, null_paths

CONTRACT_VERSION = "1"

CommandType = Literal["conference.update", "conference.supervisor_role"]
COMMAND_TYPES: tuple[str, ...] = ("conference.update", "conference.supervisor_role")
Status = Literal["succeeded", "rejected", "failed", "expired"]
ErrorCode = Literal[
    "invalid_json",
    "invalid_command",
    "unknown_type",
    "too_large",
    "idempotency_conflict",
    "forbidden",
    "superseded",
    "expired",
    "provider_rejected",
    "provider_unauthorized",
    "provider_not_found",
    "provider_unavailable",
    "rate_limited",
]

CommandId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^[^\s\x00-\x1f\x7f-\x9f]+$"),
    Field(description="Idempotency key: 1..200 printable characters, no white space."),
]
KazooId = Annotated[
    str,
    StringConstraints(
        pattern=r"^([0-9a-f]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
    ),
    Field(description="32 lower-case hex characters, or a dashed UUID."),
]


# Path segments of the Telnyx URL: no '/', no control characters, and not a dot segment.
def _not_dot_segment(value: str) -> str:
    if value in {".", ".."}:
        raise ValueError("'.' and '..' are not conference ids")
    return value


TelnyxConferenceId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=128, pattern=r"^[^/\x00-\x1f\x7f-\x9f]+$"),
    AfterValidator(_not_dot_segment),
    Field(
        description="Telnyx conference id or name: 1..128 characters, no '/', not '.' or '..'.",
        json_schema_extra={"not": {"enum": [".", ".."]}},
    ),
]
CallControlId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$"),
    Field(description="A Telnyx call control id (opaque, e.g. 'v3:...')."),
]

_COMMAND = ConfigDict(extra="forbid", strict=True, frozen=True)


class CommandBase(BaseModel):
    """Fields common to every command."""

    model_config = _COMMAND

    command_id: CommandId
    expires_at: AwareDatetime | None = Field(
        None, description="RFC 3339 deadline; after it the command ends 'expired'."
    )
    issued_at: AwareDatetime | None = Field(
        None, description="RFC 3339 time the publisher decided it (orders commands per target)."
    )


class ConferenceUpdate(CommandBase):
    """``conference.update``: replace or merge a Vinix conference document."""

    model_config = ConfigDict(title="ConferenceUpdateCommand")

    type: Literal["conference.update"]
    account_id: KazooId
    conference_id: KazooId
    conference: ConferenceDocument
    mode: Literal["replace", "merge"] = Field(
        "replace",
        description="'replace' (HTTP POST: fields left out are dropped) or 'merge' "
        "(HTTP PATCH: deep merge, null deletes a key).",
    )

    @model_validator(mode="after")
    def _no_null_in_replace(self) -> ConferenceUpdate:
        if self.mode == "replace":
            nulls = null_paths(self.conference)
            if nulls:
                raise ValueError(f"null is only allowed in merge mode (at {', '.join(nulls)})")
        return self


class SupervisorRoleChange(CommandBase):
    """``conference.supervisor_role``: set a supervisor's role in a Telnyx conference."""

    model_config = ConfigDict(title="SupervisorRoleCommand")

    type: Literal["conference.supervisor_role"]
    conference_id: TelnyxConferenceId
    call_control_id: CallControlId
    supervisor_role: Literal["barge", "monitor", "none", "whisper"]
    whisper_call_control_ids: list[CallControlId] | None = None
    region: Literal["Australia", "Europe", "Middle East", "US"] | None = None


Command = Annotated[ConferenceUpdate | SupervisorRoleChange, Field(discriminator="type")]


class ResultError(BaseModel):
    """Why a command did not succeed."""

    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    message: str
    retryable: bool
    details: Any = None


class ResultProvider(BaseModel):
    """The last provider answer."""

    model_config = ConfigDict(frozen=True)

    name: Literal["vinix", "telnyx"]
    status_code: int | None = None
    request_id: str | None = None


class ResultEvent(BaseModel):
    """Published to ``conference.results`` (routing key ``<type>.<status>``) and to ``reply_to``."""

    model_config = ConfigDict(frozen=True, title="ResultEvent")

    command_id: str | None
    type: str | None
    status: Status
    duplicate: bool = False
    attempts: int = Field(0, ge=0)
    error: ResultError | None = None
    provider: ResultProvider | None = None
    data: dict[str, Any] | None = None
    received_at: datetime
    completed_at: datetime
