"""Retries in process: backoff, Retry-After, and the three caps (attempts, budget, deadline)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from worker.errors import (
    ProviderAnswer,
    ProviderName,
    ProviderRejected,
    ProviderUnavailable,
    Superseded,
)
from worker.pipeline.gate import BreakerState, Gate, GateConfig
from worker.pipeline.retry import (
    Attempted,
    Retrier,
    RetryState,
    Verdict,
    backoff_delay,
    next_delay,
)
from worker.providers import ProviderSuccess
from worker.settings import RetryPolicy

OK = ProviderSuccess({"result": "ok"}, ProviderAnswer("telnyx", 200))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float, stopping: asyncio.Event) -> bool:
        if stopping.is_set():
            return True
        self.sleeps.append(seconds)
        self.now += seconds
        return False


class Scripted:
    """A provider that answers from a script: exceptions are raised, the rest returned."""

    name: ProviderName = "telnyx"

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def execute(self, command: Any) -> ProviderSuccess:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        pass


def unavailable(retry_after: float | None = None) -> ProviderUnavailable:
    return ProviderUnavailable("provider_unavailable", "503", retry_after_s=retry_after)


def retrier(clock: FakeClock, **policy: Any) -> Retrier:
    return Retrier(RetryPolicy(**policy), clock=clock, sleep=clock.sleep, rng=lambda: 1.0)


async def run(
    clock: FakeClock,
    provider: Scripted,
    *,
    expires_at: float | None = None,
    state: RetryState | None = None,
    stopping: asyncio.Event | None = None,
    gate: Gate | None = None,
    **policy: Any,
) -> Attempted:
    return await retrier(clock, **policy).run(
        provider,
        gate or Gate("telnyx", GateConfig(failure_threshold=100), clock=clock),
        None,
        state=state or RetryState(),
        expires_at=expires_at,
        stopping=stopping or asyncio.Event(),
    )


def test_backoff_is_exponential_and_capped() -> None:
    """Without jitter the delays double from the base delay up to the maximum."""
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0)
    assert [backoff_delay(policy, n, lambda: 1.0) for n in (1, 2, 3, 4, 5)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
    ]


def test_full_jitter_spans_zero_to_ceiling() -> None:
    """Full jitter scales the ceiling by a random factor in [0, 1)."""
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=8.0)
    assert backoff_delay(policy, 3, lambda: 0.0) == 0.0
    assert backoff_delay(policy, 3, lambda: 0.5) == 2.0


def test_retry_after_stretches_the_delay() -> None:
    """A provider's Retry-After is honoured when it asks for longer than the backoff."""
    policy = RetryPolicy(base_delay_s=0.1)
    assert next_delay(policy, 1, unavailable(retry_after=2.0), lambda: 1.0) == 2.0
    assert next_delay(policy, 1, unavailable(retry_after=0.0), lambda: 1.0) == 0.1


async def test_success_after_two_transient_failures_counts_three_attempts() -> None:
    """503, 503, then 200: the command succeeds with attempts == 3."""
    clock = FakeClock()
    provider = Scripted(unavailable(), unavailable(), OK)
    result = await run(clock, provider, expires_at=None)
    assert result.success is OK
    assert result.attempts == 3
    assert clock.sleeps == [0.2, 0.4]


async def test_permanent_error_is_not_retried() -> None:
    """A 4xx the provider will always refuse ends the command after one attempt."""
    clock = FakeClock()
    rejected = ProviderRejected("provider_not_found", "404")
    result = await run(clock, Scripted(rejected), expires_at=None)
    assert result.error is rejected
    assert result.attempts == 1


async def test_attempts_cap_ends_in_the_last_transient_error() -> None:
    """After max_attempts transient failures the command fails with the last error."""
    clock = FakeClock()
    provider = Scripted(*[unavailable() for _ in range(3)])
    result = await run(clock, provider, expires_at=None, max_attempts=3)
    assert isinstance(result.error, ProviderUnavailable)
    assert result.attempts == 3


async def test_budget_cap_stops_before_a_wait_that_would_overrun_it() -> None:
    """A retry that would start after the time budget is not made."""
    clock = FakeClock()
    provider = Scripted(unavailable(retry_after=10.0), OK)
    result = await run(clock, provider, expires_at=None, budget_s=5.0)
    assert isinstance(result.error, ProviderUnavailable)
    assert result.attempts == 1
    assert clock.sleeps == []


async def test_deadline_in_the_past_makes_no_call() -> None:
    """A command already past expires_at is never sent: expired with 0 attempts."""
    clock = FakeClock()
    provider = Scripted(OK)
    result = await run(clock, provider, expires_at=clock.now - 1)
    assert result.error is not None
    assert result.error.code == "expired"
    assert (result.attempts, provider.calls) == (0, 0)


async def test_wait_past_the_deadline_expires_at_once() -> None:
    """When the next retry would start after expires_at, the command expires without waiting."""
    clock = FakeClock()
    provider = Scripted(unavailable(retry_after=30.0), OK)
    result = await run(clock, provider, expires_at=clock.now + 10)
    assert result.error is not None
    assert result.error.status == "expired"
    assert result.attempts == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("attempts", [1, 2, 5])
async def test_attempt_count_matches_provider_calls(attempts: int) -> None:
    """``attempts`` is exactly the number of provider calls made."""
    clock = FakeClock()
    provider = Scripted(*[unavailable() for _ in range(attempts - 1)], OK)
    result = await run(clock, provider, expires_at=None, max_attempts=5)
    assert result.attempts == provider.calls == attempts


async def test_long_wait_is_deferred_to_the_broker_with_its_state() -> None:
    """A wait longer than inline_max_s leaves the consumer: deferred, attempts and budget kept."""
    clock = FakeClock()
    provider = Scripted(unavailable(retry_after=20.0))
    result = await run(clock, provider, inline_max_s=2.0)
    assert result.defer_s == 20.0
    assert result.state.attempts == 1
    assert result.state.budget_used_s == pytest.approx(20.0)
    assert result.state.first_failure_at == clock.now


async def test_a_deferred_command_continues_its_count() -> None:
    """Back from the delay, attempts continue where they were and the budget keeps running."""
    clock = FakeClock()
    state = RetryState(attempts=2, budget_used_s=100.0, first_failure_at=clock.now - 100)
    provider = Scripted(unavailable(retry_after=30.0))
    result = await run(clock, provider, state=state, budget_s=120.0)
    assert isinstance(result.error, ProviderUnavailable)
    assert result.attempts == 3
    ok = await run(clock, Scripted(OK), state=RetryState(attempts=3))
    assert (ok.success, ok.attempts) == (OK, 4)


async def test_stopping_defers_instead_of_sleeping() -> None:
    """During shutdown a backoff is handed to the broker rather than slept."""
    clock = FakeClock()
    stopping = asyncio.Event()
    stopping.set()
    result = await run(clock, Scripted(unavailable(), OK), stopping=stopping)
    assert result.defer_s is not None
    assert result.attempts == 1


async def test_open_breaker_waits_without_charging_the_budget() -> None:
    """Time spent waiting for an open breaker is not charged to the retry budget."""
    gate = Gate("telnyx", GateConfig(failure_threshold=1, cooldown_s=0.2))
    gate.failed()
    retrier = Retrier(RetryPolicy(budget_s=0.1, base_delay_s=0.01), rng=lambda: 1.0)
    result = await retrier.run(
        Scripted(unavailable(), OK),
        gate,
        None,
        state=RetryState(),
        expires_at=None,
        stopping=asyncio.Event(),
    )
    assert result.success is OK
    assert result.attempts == 2
    assert gate.state is BreakerState.CLOSED


async def test_deadline_passing_at_an_open_breaker_expires() -> None:
    """A command whose expires_at passes while the breaker is open ends expired, uncalled."""
    clock = FakeClock()
    gate = Gate("telnyx", GateConfig(failure_threshold=1, cooldown_s=1_000.0), clock=clock)
    gate.failed()
    provider = Scripted(OK)
    result = await run(clock, provider, gate=gate, expires_at=clock.now + 0.001)
    assert result.error is not None
    assert result.error.code == "expired"
    assert provider.calls == 0


async def test_failed_probes_do_not_use_up_the_attempts() -> None:
    """Calls made as the breaker's probe are counted, not capped: an outage cannot exhaust them."""
    gate = Gate("telnyx", GateConfig(failure_threshold=1, cooldown_s=0.01))
    gate.failed()
    retrier = Retrier(RetryPolicy(max_attempts=2, base_delay_s=0.001), rng=lambda: 1.0)
    provider = Scripted(*[unavailable() for _ in range(4)], OK)
    result = await retrier.run(
        provider, gate, None, state=RetryState(), expires_at=None, stopping=asyncio.Event()
    )
    assert result.success is OK
    assert (result.attempts, result.state.probes) == (5, 4)


async def admitted_run(provider: Scripted, admit: Any, clock: FakeClock) -> Attempted:
    return await retrier(clock).run(
        provider,
        Gate("telnyx", GateConfig(failure_threshold=100), clock=clock),
        None,
        state=RetryState(),
        expires_at=None,
        stopping=asyncio.Event(),
        admit=admit,
    )


async def test_no_further_call_once_the_delivery_is_gone() -> None:
    """A delivery whose channel closed during a backoff makes no further call (its redelivered
    copy may already run elsewhere): ``gone``, and the attempts stay those that were made."""
    clock = FakeClock()
    provider = Scripted(unavailable(), OK)

    async def admit(waited: bool) -> Verdict:
        return Verdict.GO if provider.calls == 0 else Verdict.GONE

    result = await admitted_run(provider, admit, clock)
    assert (result.gone, result.success, result.attempts, provider.calls) == (True, None, 1, 1)


async def test_a_retry_overtaken_by_a_newer_command_ends_superseded() -> None:
    """Before a retry the pipeline is asked again, told that time passed; a command overtaken
    meanwhile ends superseded (final, no call).  The first call is not a wait: told so."""
    clock = FakeClock()
    provider = Scripted(unavailable(), OK)
    asked: list[bool] = []

    async def admit(waited: bool) -> Verdict:
        asked.append(waited)
        return Verdict.STALE if waited else Verdict.GO

    result = await admitted_run(provider, admit, clock)
    assert asked == [False, True]
    assert isinstance(result.error, Superseded)
    assert (result.attempts, provider.calls) == (1, 1)


async def test_a_cancelled_probe_gives_the_probe_back() -> None:
    """The half-open probe's call cancelled midway (a stop's grace over) does not leave the
    breaker waiting for an answer for ever."""
    clock = FakeClock()
    gate = Gate("telnyx", GateConfig(failure_threshold=1), clock=clock)
    gate.failed()
    clock.now += 3600  # the cool-down is over: the next call is the probe

    class Hanging(Scripted):
        async def execute(self, command: Any) -> ProviderSuccess:
            self.calls += 1
            await asyncio.Event().wait()
            raise AssertionError

    provider = Hanging()
    call = asyncio.create_task(run(clock, provider, gate=gate))
    while provider.calls == 0:
        await asyncio.sleep(0)
    assert gate.probing
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    assert not gate.probing


async def test_a_shared_failure_does_not_count_again_in_the_breaker() -> None:
    """Callers that got another caller's failure (one failed token fetch handed to every command
    queued behind it) do not count it again: 20 of them do not open a breaker of threshold 5."""
    clock = FakeClock()
    gate = Gate("telnyx", GateConfig(failure_threshold=5), clock=clock)
    async with asyncio.timeout(5):  # an open breaker would hold the next run for its cool-down
        for _ in range(20):
            shared = unavailable()
            shared.shared = True
            await run(clock, Scripted(shared), gate=gate, max_attempts=1)
    assert gate.state.name == "CLOSED"
    await run(clock, Scripted(*(unavailable() for _ in range(5))), gate=gate, max_attempts=5)
    assert gate.state.name == "OPEN"  # five failures of its own do
