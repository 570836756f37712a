"""Exponential backoff with jitter for the calls that are safe to repeat."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from raven_client.errors import RavenError, from_rpc_error

T = TypeVar("T")

# Called before each wait: (method, failed attempt number from 1, its error, seconds to wait).
RetryHook = Callable[[str, int, RavenError, float], None]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a safe call is repeated while the service is UNAVAILABLE.

    The n-th wait is drawn between half and all of
    `min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1))`."""

    attempts: int = 6
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")

    def backoff_s(self, failures: int, rng: random.Random | None = None) -> float:
        """The wait after the `failures`-th failure in a row (1 for the first)."""
        ceiling = min(
            self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (failures - 1)
        )
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


NO_RETRIES = RetryPolicy(attempts=1)


def call_with_retries(
    method: str,
    attempt: Callable[[], T],
    policy: RetryPolicy,
    on_retry: RetryHook | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`attempt()` until it succeeds, fails otherwise than UNAVAILABLE, or `policy` runs out;
    a failure raises its typed exception (raven_client.errors)."""
    failures = 0
    while True:
        try:
            return attempt()
        except grpc.RpcError as rpc_error:
            error = from_rpc_error(rpc_error)
            failures += 1
            if error.code != grpc.StatusCode.UNAVAILABLE or failures >= policy.attempts:
                raise error from rpc_error
        wait = policy.backoff_s(failures)
        if on_retry is not None:
            on_retry(method, failures, error, wait)
        sleep(wait)
