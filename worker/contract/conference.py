"""The Kazoo ``conferences`` document, as the worker validates it before calling Vinix.

Mirrors ``conferences.json`` and ``conferences.profile.json`` of 2600hz/kazoo (see
``shared/fixtures/kazoo``): no field is required and unknown keys are kept, as Kazoo keeps them.
Types are checked the way Kazoo does in its default non-strict mode, which coerces ``"5"`` to an
integer and ``"true"`` to a boolean before it gives up.  ``null`` is accepted everywhere because a
``merge`` (HTTP PATCH) deletes a key with it; :class:`~worker.contract.messages.ConferenceUpdate`
refuses ``null`` in ``replace`` mode, where Kazoo's schema would reject it.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)


def _kazoo_int(value: Any) -> Any:
    """Kazoo's non-strict coercion: integers, or strings of digits; never booleans or floats."""
    if isinstance(value, bool | float):
        raise ValueError("Value did not match type(s): integer")
    if isinstance(value, str):
        try:
            return int(value, 10)
        except ValueError:
            raise ValueError("Value did not match type(s): integer") from None
    return value


def _kazoo_bool(value: Any) -> Any:
    """Kazoo's non-strict coercion: booleans, or the strings "true" and "false"; nothing else."""
    if isinstance(value, bool) or value is None:
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ValueError("Value did not match type(s): boolean")


KInt = Annotated[int, BeforeValidator(_kazoo_int)]
KBool = Annotated[bool, BeforeValidator(_kazoo_bool)]
Digits = Annotated[str, StringConstraints(pattern=r"^[0-9]+$")]


def _unique(items: list[str] | None) -> list[str] | None:
    if items is not None and len(set(items)) != len(items):
        raise ValueError("List of items is not unique")
    return items


UniqueDigits = Annotated[
    list[Digits] | None,
    AfterValidator(_unique),
    Field(default=None, json_schema_extra={"uniqueItems": True}),
]
Digitses = Annotated[list[Digits] | None, Field(default=None)]

_DOC = ConfigDict(extra="allow", frozen=True)


class Member(BaseModel):
    """``member``: how ordinary participants join."""

    model_config = _DOC

    join_deaf: KBool | None = None
    join_muted: KBool | None = None
    numbers: UniqueDigits
    pins: Digitses
    play_entry_prompt: KBool | None = None


class Moderator(BaseModel):
    """``moderator``: how moderators join."""

    model_config = _DOC

    join_deaf: KBool | None = None
    join_muted: KBool | None = None
    numbers: UniqueDigits
    pins: Digitses


class Profile(BaseModel):
    """``conferences.profile``: media-server settings (hyphenated keys, as Kazoo spells them).

    An underscore spelling of a hyphenated key (``max_members``) is refused: Kazoo would store it
    as an unknown key and ignore it, which is never what the publisher meant.
    """

    model_config = _DOC

    @model_validator(mode="before")
    @classmethod
    def _no_underscore_spellings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if field.alias and field.alias != name and name in data:
                    raise ValueError(f"unknown key {name!r}: Kazoo spells it {field.alias!r}")
        return data

    alone_sound: str | None = Field(None, alias="alone-sound")
    announce_count: KInt | None = Field(None, alias="announce-count")
    caller_controls: str | None = Field(None, alias="caller-controls")
    comfort_noise: KInt | None = Field(None, alias="comfort-noise", ge=0, le=10000)
    energy_level: KInt | None = Field(None, alias="energy-level", ge=0, le=1800)
    enter_sound: str | None = Field(None, alias="enter-sound")
    exit_sound: str | None = Field(None, alias="exit-sound")
    interval: KInt | None = Field(None, ge=10, le=120)
    locked_sound: str | None = Field(None, alias="locked-sound")
    max_members: KInt | None = Field(None, alias="max-members", ge=2)
    max_members_sound: str | None = Field(None, alias="max-members-sound")
    moderator_controls: str | None = Field(None, alias="moderator-controls")
    moh_sound: str | None = Field(None, alias="moh-sound")
    muted_sound: str | None = Field(None, alias="muted-sound")
    rate: Literal[8000, 12000, 16000, 24000, 32000, 44100, 48000] | None = None
    unmuted_sound: str | None = Field(None, alias="unmuted-sound")


class ConferenceDocument(BaseModel):
    """A Vinix/Kazoo conference document (``data`` of ``POST .../conferences/{id}``)."""

    model_config = _DOC

    bridge_password: str | None = None
    bridge_username: str | None = None
    caller_controls: str | None = None
    conference_numbers: UniqueDigits
    controls: dict[str, Any] | None = None
    domain: str | None = None
    flags: list[str] | None = None
    focus: str | None = None
    language: str | None = None
    max_members_media: str | None = None
    max_participants: KInt | None = None
    member: Member | None = None
    moderator: Moderator | None = None
    moderator_controls: str | None = None
    name: str | None = Field(None, min_length=1, max_length=128)
    owner_id: str | None = Field(None, min_length=32, max_length=32)
    play_entry_tone: bool | str | None = None
    play_exit_tone: bool | str | None = None
    play_name: KBool | None = None
    play_welcome: KBool | None = None
    profile: Profile | None = None
    profile_name: str | None = None
    require_moderator: KBool | None = None
    wait_for_moderator: KBool | None = None

    @model_validator(mode="after")
    def _integers_fit_64_bits(self) -> ConferenceDocument:
        # orjson, which writes the request body, holds integers in [-2**63, 2**64 - 1] and
        # refuses others; asking it is ten times cheaper than walking the tree in Python.
        try:
            orjson.dumps(self.to_wire())
        except orjson.JSONEncodeError as exc:
            if "Integer" in str(exc):
                raise ValueError("integers must be between -2**63 and 2**64 - 1") from None
            raise ValueError(f"the document cannot be sent as JSON: {exc}") from None
        return self

    def to_wire(self) -> dict[str, Any]:
        """The document as it goes to Vinix: only what the publisher set, in Kazoo's spelling.

        Made once (the model is frozen) and shared by the validation, the fingerprint and the
        request body: callers must not change it.
        """
        return self.wire

    @cached_property
    def wire(self) -> dict[str, Any]:
        """:meth:`to_wire`, cached in the instance (no field: ignored by dumps and ``==``)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def null_paths(doc: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the schema fields set to ``null`` (Kazoo's schema allows none of them).

    Unknown keys, and free-form objects such as ``controls``, may hold ``null``: Kazoo keeps them.
    """
    found: list[str] = []
    fields = type(doc).model_fields
    for name in doc.model_fields_set & fields.keys():
        value = getattr(doc, name)
        path = f"{prefix}{fields[name].alias or name}"
        if value is None:
            found.append(path)
        elif isinstance(value, BaseModel):
            found.extend(null_paths(value, f"{path}."))
    return found
