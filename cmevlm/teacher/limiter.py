"""A client-side rate limiter that all actors of a stage share (one Ray actor holds it).

Requests are spaced, not burst: each reservation gets the earliest start that keeps both the
request rate (rpm) and the token rate (tpm) under the quota, and the caller sleeps until then.
Spacing keeps a cluster under a provider quota measured over any window, and at a steady
backlog it sends at the full rate.
"""

from __future__ import annotations

import time


class RateLimiter:
    def __init__(self, rpm: float, tpm: float, clock=time.monotonic):
        self.req_interval = 60.0 / rpm  # seconds between request starts
        self.token_seconds = 60.0 / tpm  # seconds of quota one token uses
        self.clock = clock
        self.next_request = 0.0
        self.next_token = 0.0

    def reserve(self, tokens: int = 0) -> float:
        """Reserve a slot for one request of about `tokens` tokens; returns seconds to wait."""
        now = self.clock()
        start = max(now, self.next_request, self.next_token)
        self.next_request = start + self.req_interval
        self.next_token = start + tokens * self.token_seconds
        return start - now


def local_waiter(limiter: RateLimiter):
    """`wait(tokens)` for one process."""
    return lambda tokens: time.sleep(limiter.reserve(tokens))


def ray_waiter(actor):
    """`wait(tokens)` through a shared Ray actor wrapping `RateLimiter`; the actor returns the
    delay on its own clock, so callers on other nodes need no synchronised clocks."""
    import ray

    return lambda tokens: time.sleep(ray.get(actor.reserve.remote(tokens)))


class Budget:
    """The money a stage may still spend on its LLM (`max_cost_usd`, with what the audit shows
    was spent in earlier runs counted), shared like the rate limiter. A request may leave while
    what was billed so far is under the cap (`reserve(0)`), and is settled to its bill after: the
    cap is passed by at most the requests in flight, one per concurrent actor. A batch job,
    whose bill comes hours later, reserves its largest possible cost and is refused if that
    could pass the cap."""

    def __init__(self, cap_usd: float | None, spent_usd: float = 0.0):
        self.cap, self.spent, self.reserved = cap_usd, spent_usd, 0.0

    def reserve(self, usd: float) -> bool:
        if self.cap is not None and (self.spent + self.reserved + usd > self.cap if usd else self.spent >= self.cap):
            return False
        self.reserved += usd
        return True

    def settle(self, reserved: float, billed: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
        self.spent += billed

    def state(self) -> dict:
        return {"cap_usd": self.cap, "spent_usd": round(self.spent, 6)}


class RayBudget:
    """`Budget`'s calls through a shared Ray actor."""

    def __init__(self, actor):
        self.actor = actor

    def reserve(self, usd: float) -> bool:
        import ray

        return ray.get(self.actor.reserve.remote(usd))

    def settle(self, reserved: float, billed: float) -> None:
        self.actor.settle.remote(reserved, billed)
