"""The retry budget in time as well as tries: an outage shorter than ``max_elapsed`` is
survived however many tries it eats; tries still count when each one is slow. A fake clock
(sleeps advance it, nothing waits) keeps the tests exact: they assert on attempts and
outcomes, never on durations."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from replay_bridge.client import (HTTPError, MockTransport, Prompt, RetryPolicy, RolloutClient,
                                  SamplingParams, TransportError, collect)
from replay_bridge.geometry import RoutingGeometry
from replay_bridge.shards import ShardReader, ShardWriter

from .test_transport import answer

# What `collect --retries 2 --max-retry-delay 0.5` asks for, with and without a time budget.
COUNT_ONLY = RetryPolicy(max_attempts=3, base_delay=0.25, max_delay=0.5, max_elapsed=0.0)


class FakeClockTransport(MockTransport):
    """A MockTransport on a fake clock: each try takes ``cost`` seconds, each backoff sleep
    advances the clock by its delay. The engine is down (connection refused) until
    ``outage`` seconds have passed."""

    def __init__(self, outage: float, retry: RetryPolicy, *, cost: float = 0.01,
                 handler: Any = None) -> None:
        super().__init__(handler or (lambda path, payload: b"ok"), retry=retry, seed=0)
        self.clock, self.outage, self.cost = 0.0, outage, cost
        self.attempts = 0

    def _now(self) -> float:
        return self.clock

    async def _sleep(self, seconds: float) -> None:
        self.clock += seconds
        await asyncio.sleep(0)

    async def send_once(self, path: str, payload: Any) -> bytes:
        self.attempts += 1
        self.clock += self.cost
        if self.clock < self.outage:
            raise TransportError(f"ClientConnectorError on POST {path}: refused",
                                 retryable=True)
        return await super().send_once(path, payload)


def post(t: FakeClockTransport) -> bytes:
    async def go() -> bytes:
        return await t.post("/generate", {})
    return asyncio.run(go())


def test_a_count_only_budget_gives_up_inside_a_16s_outage() -> None:
    t = FakeClockTransport(16.0, COUNT_ONLY)
    with pytest.raises(TransportError, match="gave up after 3 attempts") as ei:
        post(t)
    assert t.attempts == ei.value.attempts == 3 and t.clock < 16.0


def test_a_time_budget_outlasts_a_16s_outage_whatever_the_count() -> None:
    t = FakeClockTransport(16.0, RetryPolicy(max_attempts=3, base_delay=0.25, max_delay=0.5,
                                             max_elapsed=30.0))
    assert post(t) == b"ok"
    # Each wait is at most max_delay: it took many more than 3 tries to get past 16 s.
    assert t.attempts >= 16.0 / (0.5 + 0.01) and t.retries == t.attempts - 1
    assert t.clock >= 16.0


def test_a_time_budget_shorter_than_the_outage_gives_up_when_spent() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=0.25, max_delay=0.5, max_elapsed=10.0)
    t = FakeClockTransport(16.0, policy)
    with pytest.raises(TransportError) as ei:
        post(t)
    assert ei.value.attempts == t.attempts > 3
    assert "gave up after" in str(ei.value) and ei.value.retryable
    # Gave up on the first failure at or past 10 s: one wait and one try past it at most.
    assert 10.0 <= t.clock <= 10.0 + 0.5 + 0.01


@pytest.mark.parametrize("max_attempts, expected", [(4, 4), (2, 3)])
def test_the_count_still_grants_tries_when_each_is_slow(max_attempts: int,
                                                        expected: int) -> None:
    """Tries of 50 s (timeouts) against a 120 s budget: the request is tried while it has made
    fewer than max_attempts tries or less than 120 s have passed, whichever lasts longer."""
    policy = RetryPolicy(max_attempts=max_attempts, base_delay=0.0, max_delay=0.0,
                         max_elapsed=120.0)
    t = FakeClockTransport(1e9, policy, cost=50.0)
    with pytest.raises(TransportError) as ei:
        post(t)
    assert t.attempts == ei.value.attempts == expected


def test_a_4xx_is_never_retried_whatever_the_time_budget() -> None:
    def refuse(path: str, payload: Any) -> bytes:
        raise HTTPError(401, "mock://e" + path, b"no")

    t = FakeClockTransport(0.0, RetryPolicy(max_elapsed=600.0), handler=refuse)
    with pytest.raises(HTTPError):
        post(t)
    assert t.attempts == 1 and t.retries == 0


def test_backoff_has_no_overflow_after_many_retries() -> None:
    policy = RetryPolicy(base_delay=0.25, max_delay=8.0)
    rng = random.Random(0)
    assert all(0.0 <= policy.delay(i, rng) <= 8.0 for i in (1023, 1024, 5000, 10**6))


@pytest.mark.parametrize("bad", [{"max_attempts": 0}, {"max_elapsed": -1.0},
                                 {"max_delay": float("nan")}, {"base_delay": -0.1}])
def test_a_nonsense_policy_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        RetryPolicy(**bad)


@pytest.mark.parametrize("max_elapsed, stored", [(0.0, 0), (30.0, 6)])
def test_collect_through_an_outage(max_elapsed: float, stored: int, tiny: RoutingGeometry,
                                   tmp_path: Path) -> None:
    """collect with `--retries 2`: a 16 s outage fails every sample on a count-only budget and
    stores every one with a 30 s time budget."""
    policy = RetryPolicy(max_attempts=3, base_delay=0.25, max_delay=0.5,
                         max_elapsed=max_elapsed)
    transport = FakeClockTransport(16.0, policy,
                                   handler=lambda path, p: answer("sglang", tiny, p))

    async def go() -> Any:
        with ShardWriter(tmp_path / "o", tiny) as writer:
            async with RolloutClient("mock://", "sglang", tiny, params=SamplingParams(3),
                                     concurrency=2, transport=transport) as client:
                return await collect(client, [Prompt(f"o{i}", [1, 2, i]) for i in range(6)],
                                     writer)

    summary = asyncio.run(go())
    assert (summary.stored, summary.failed) == (stored, 6 - stored)
    with ShardReader(tmp_path / "o") as reader:
        assert len(reader.sample_ids()) == stored
