"""The sandbox's demo data: keys, accounts, conferences and calls, the same on every start.

Every id is derived from a fixed seed with BLAKE2b, so ``--conferences 10000`` costs a few
milliseconds and two sandboxes started with the same count agree on every id.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

SEED = "conference-worker/sandbox/v1"


def _digest(*parts: object, size: int = 16) -> bytes:
    text = "/".join(str(part) for part in (SEED, *parts))
    return hashlib.blake2b(text.encode(), digest_size=size).digest()


def kazoo_id(*parts: object) -> str:
    """32 lower-case hex characters, the shape of Kazoo's account and document ids."""
    return _digest(*parts).hex()


def call_control_id(*parts: object) -> str:
    """An opaque ``v3:…`` call control id, shaped like Telnyx's."""
    return "v3:" + base64.urlsafe_b64encode(_digest(*parts, size=30)).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class VinixFixtures:
    """One Kazoo account, its API key, and its conference ids."""

    api_key: str
    account_id: str
    reseller_id: str
    conference_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConferenceCalls:
    """The two calls of a Telnyx demo conference."""

    supervisor: str
    agent: str


@dataclass(frozen=True, slots=True)
class TelnyxFixtures:
    """The Telnyx API key, conference ids (UUIDs) and the calls in each conference."""

    api_key: str
    conference_ids: tuple[str, ...]
    calls: dict[str, ConferenceCalls]

    @property
    def call_control_ids(self) -> list[str]:
        """Every call, conference by conference: supervisor then agent."""
        return [cid for conf in self.conference_ids for cid in _pair(self.calls[conf])]


def _pair(call: ConferenceCalls) -> tuple[str, str]:
    return call.supervisor, call.agent


@dataclass(frozen=True, slots=True)
class Fixtures:
    """Everything a client needs to talk to the sandbox."""

    vinix: VinixFixtures
    telnyx: TelnyxFixtures

    @classmethod
    def generate(cls, conferences: int) -> Fixtures:
        """The deterministic demo data with ``conferences`` conferences per provider."""
        if conferences < 1:
            raise ValueError("the sandbox needs at least one conference")
        vinix = VinixFixtures(
            api_key=_digest("vinix", "api_key", size=32).hex(),
            account_id=kazoo_id("vinix", "account"),
            reseller_id=kazoo_id("vinix", "reseller"),
            conference_ids=tuple(kazoo_id("vinix", "conference", i) for i in range(conferences)),
        )
        telnyx_ids = tuple(
            str(uuid.UUID(bytes=_digest("telnyx", "conference", i), version=4))
            for i in range(conferences)
        )
        telnyx = TelnyxFixtures(
            api_key="KEY" + _digest("telnyx", "api_key").hex().upper(),
            conference_ids=telnyx_ids,
            calls={
                conf: ConferenceCalls(
                    supervisor=call_control_id("telnyx", conf, "supervisor"),
                    agent=call_control_id("telnyx", conf, "agent"),
                )
                for conf in telnyx_ids
            },
        )
        return cls(vinix, telnyx)

    def document(self) -> dict[str, Any]:
        """The ``GET /__admin/fixtures`` document.

        ``telnyx.calls_by_conference`` maps each conference to its calls, supervisor first;
        ``telnyx.call_control_ids`` is the same calls flattened, conference by conference.
        """
        vinix, telnyx = self.vinix, self.telnyx
        return {
            "vinix": {
                "api_key": vinix.api_key,
                "account_id": vinix.account_id,
                "conference_ids": list(vinix.conference_ids),
            },
            "telnyx": {
                "api_key": telnyx.api_key,
                "conference_ids": list(telnyx.conference_ids),
                "call_control_ids": telnyx.call_control_ids,
                "calls_by_conference": {
                    conf: list(_pair(calls)) for conf, calls in telnyx.calls.items()
                },
            },
        }
