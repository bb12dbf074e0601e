"""Injected faults (WireMock style): errors, latency and dropped connections on demand.

A fault is posted to ``/__admin/faults`` as JSON, for example::

    {"provider": "telnyx", "status": 503, "count": 3, "retry_after_s": 1}
    {"latency_ms": 100}
    {"provider": "vinix", "error": "disconnect", "method": "POST", "path_prefix": "/v2/accounts/"}
    {"status": 503, "probability": 0.33, "seed": 7}

It applies to the next ``count`` matching provider requests (or until deleted when ``count`` is
left out).  Filters: ``provider``, ``method``, ``path_prefix`` (matched against the raw,
still percent-encoded path).  ``probability`` makes a matching request fail only that fraction
of the time (``seed`` makes the draw repeatable); a request that escapes the draw does not use
up ``count``.  Several faults may be active: the first that matches and fires applies.

What a fault does: wait ``latency_ms``; then close the connection without an answer
(``"error": "disconnect"``), or answer ``status`` in the provider's own error shape (or with
``body`` verbatim) with ``Retry-After`` when ``retry_after_s`` is given; a latency-only fault
lets the request through to the simulator afterwards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ProviderFilter = Literal["vinix", "telnyx"]


class FaultSpec(BaseModel):
    """What ``POST /__admin/faults`` accepts (one object or a list of them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: ProviderFilter | None = None
    status: int | None = Field(None, ge=100, le=599)
    error: Literal["disconnect"] | None = None
    latency_ms: float = Field(0.0, ge=0, le=600_000)
    retry_after_s: float | None = Field(None, ge=0)
    count: int | None = Field(None, ge=1)
    method: str | None = None
    path_prefix: str | None = None
    probability: float | None = Field(None, gt=0, le=1)
    seed: int | str | None = None
    body: Any = None

    @model_validator(mode="after")
    def _does_something(self) -> FaultSpec:
        if self.status is None and self.error is None and not self.latency_ms:
            raise ValueError("a fault needs a status, an error or a latency_ms")
        if self.status is not None and self.error is not None:
            raise ValueError("status and error exclude each other")
        return self


class FaultSpecError(ValueError):
    """The posted fault is not a valid :class:`FaultSpec`."""


@dataclass(slots=True)
class Fault:
    """An active fault and how many more requests it applies to."""

    fault_id: int
    spec: FaultSpec
    remaining: int | None
    rng: random.Random = field(repr=False)

    @property
    def latency_s(self) -> float:
        """How long to wait before anything else."""
        return self.spec.latency_ms / 1000.0

    @property
    def has_body(self) -> bool:
        """Whether the fault answers with its own ``body`` (even ``null``)."""
        return "body" in self.spec.model_fields_set

    @property
    def disconnects(self) -> bool:
        """Whether the connection is closed without an answer."""
        return self.spec.error == "disconnect"

    def matches(self, provider: str, method: str, raw_path: str) -> bool:
        """Whether the filters select this request."""
        spec = self.spec
        return (
            (spec.provider is None or spec.provider == provider)
            and (spec.method is None or spec.method.upper() == method)
            and (spec.path_prefix is None or raw_path.startswith(spec.path_prefix))
        )

    def fires(self) -> bool:
        """The ``probability`` draw (always True without one)."""
        probability = self.spec.probability
        return probability is None or self.rng.random() < probability

    def describe(self) -> dict[str, Any]:
        """The fault as posted, with its id and remaining count."""
        spec = self.spec.model_dump(exclude_defaults=True)
        return {"id": self.fault_id, **spec, "remaining": self.remaining}


class FaultBook:
    """The active faults, in the order they were added."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._next_id = 1

    def add(self, posted: Any) -> list[Fault]:
        """Add one fault or a list of them; :class:`FaultSpecError` if any is invalid."""
        items = posted if isinstance(posted, list) else [posted]
        try:
            specs = [FaultSpec.model_validate(item) for item in items]
        except ValidationError as exc:
            raise FaultSpecError(str(exc)) from exc
        added = []
        for spec in specs:
            added.append(Fault(self._next_id, spec, spec.count, random.Random(spec.seed)))
            self._next_id += 1
        self._faults.extend(added)
        return added

    def pick(self, provider: str, method: str, raw_path: str) -> Fault | None:
        """The fault that applies to this request (its count is used up by one), or None."""
        if not self._faults:
            return None
        for fault in self._faults:
            if fault.matches(provider, method, raw_path) and fault.fires():
                self._use(fault)
                return fault
        return None

    def _use(self, fault: Fault) -> None:
        if fault.remaining is None:
            return
        fault.remaining -= 1
        if fault.remaining <= 0:
            self._faults.remove(fault)

    def remove(self, fault_id: int) -> bool:
        """Delete one fault; False if there is no such fault."""
        for fault in self._faults:
            if fault.fault_id == fault_id:
                self._faults.remove(fault)
                return True
        return False

    def clear(self) -> int:
        """Delete every fault; how many there were."""
        count = len(self._faults)
        self._faults.clear()
        return count

    def describe(self) -> list[dict[str, Any]]:
        """The active faults, for ``GET /__admin/faults``."""
        return [fault.describe() for fault in self._faults]
