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
