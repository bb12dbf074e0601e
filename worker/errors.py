"""What can go wrong with a command, shaped by what then happens to the message.

```
WorkerError                       every error the pipeline knows how to finish a command with
├── PermanentError                status "rejected": never retried, dead-lettered
│   ├── InvalidMessage            invalid_json · invalid_command · unknown_type · too_large
│   ├── IdempotencyConflict       idempotency_conflict (the stored result is left untouched)
│   ├── Superseded                superseded (a newer command for the target was already applied)
│   └── ProviderRejected          provider_rejected · provider_not_found · provider_unauthorized
├── TransientError                retried within the budget; status "failed" once it is spent
│   └── ProviderUnavailable       provider_unavailable · rate_limited (may carry retry_after_s)
└── DeadlineExceeded              status "expired": ``expires_at`` passed before success

StoreUnavailable                  not a command outcome: the dedup store cannot be reached, so
                                  the message is held (never finished, never double-run)
```

Third-party errors (aiohttp, pydantic, orjson) are translated into this tree once, where they
are raised: in :mod:`worker.contract.codec` and in :mod:`worker.providers`.  The consumer turns the
final outcome into ack / dead-letter in exactly one place (:func:`worker.app.settle.settle`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

Status = Literal["succeeded", "rejected", "failed", "expired"]
ProviderName = Literal["vinix", "telnyx"]


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """The last thing a provider said: which provider, the HTTP status and its request id."""

    name: ProviderName
    status_code: int | None = None
    request_id: str | None = None


class WorkerError(Exception):
    """A reason to finish a command without success; ``code`` is the contract's error code."""

    status: ClassVar[Status]
    retryable: ClassVar[bool]

    def __init__(
        self,
        code: str,
        message: str,
        *,
        details: Any = None,
        provider: ProviderAnswer | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.provider = provider
        # Handed on from a call that another command made (callers queued behind one failed
        # token fetch): the provider answered once, so a circuit breaker counts it once.
        self.shared = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class PermanentError(WorkerError):
    """It can never succeed as sent: the command ends ``rejected``."""

    status = "rejected"
    retryable = False


class InvalidMessage(PermanentError):
    """The message itself is unusable (bad JSON, schema violation, unknown type, too large)."""


class IdempotencyConflict(PermanentError):
    """The ``command_id`` was already used with a different payload."""

    def __init__(self, message: str = "command_id was already used with a different payload"):
        super().__init__("idempotency_conflict", message)


class Superseded(PermanentError):
    """A command issued after this one was already applied to the same target."""

    def __init__(
        self, message: str = "a newer command for the same target was already applied"
    ) -> None:
        super().__init__("superseded", message)


class ProviderRejected(PermanentError):
    """The provider answered with a 4xx that no retry can fix."""


class TransientError(WorkerError):
    """Worth another try; the command ends ``failed`` when the retry budget is spent."""

    status = "failed"
    retryable = True


class ProviderUnavailable(TransientError):
    """Timeouts, connection errors, 408, 409 (Vinix), 429 and 5xx answers."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after_s: float | None = None,
        details: Any = None,
        provider: ProviderAnswer | None = None,
    ) -> None:
        super().__init__(code, message, details=details, provider=provider)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(WorkerError):
    """``expires_at`` passed (or will have passed) before the command could succeed."""

    status = "expired"
    retryable = False

    def __init__(
        self,
        message: str = "expires_at passed before the command could succeed",
        *,
        provider: ProviderAnswer | None = None,
    ) -> None:
        super().__init__("expired", message, provider=provider)


class StoreUnavailable(Exception):
    """The deduplication store cannot be reached; raised by the dedup backends only."""
