"""Provider clients: one per telephony API, behind one small Protocol.

A client makes exactly one logical attempt per :meth:`Provider.execute` call and translates
every answer at this boundary: a 2xx becomes :class:`ProviderSuccess`; anything else raises
:class:`worker.errors.ProviderRejected` (permanent) or :class:`worker.errors.ProviderUnavailable`
(transient, maybe with ``retry_after_s``).  Retrying is the pipeline's business, not the client's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from worker.contract.messages import ConferenceUpdate, SupervisorRoleChange
from worker.errors import ProviderAnswer, ProviderName


@dataclass(frozen=True, slots=True)
class ProviderSuccess:
    """A 2xx answer: the provider's ``data`` and who answered."""

    data: dict[str, Any] | None
    answer: ProviderAnswer


class Provider(Protocol):
    """One telephony API."""

    name: ProviderName

    async def execute(self, command: Any) -> ProviderSuccess:
        """Carry out ``command`` once; raise a :class:`worker.errors.WorkerError` otherwise."""
        ...

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        ...


VinixCommand = ConferenceUpdate
TelnyxCommand = SupervisorRoleChange

__all__ = ["Provider", "ProviderSuccess", "TelnyxCommand", "VinixCommand"]
