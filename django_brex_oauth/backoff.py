"""Exponential backoff with jitter, shared by API retries, the refresh task and every wait
for a lock another process holds."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator


def backoff_delay(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to wait before retry number ``attempt + 1`` (``attempt`` counts from 0).

    The ceiling doubles with every attempt (``base``, ``2 * base``, ``4 * base``, ... up to
    ``cap``) and the delay is drawn between half the ceiling and the ceiling, so that many
    clients failing at the same moment do not retry in lockstep.
    """
    ceiling = min(float(cap), float(base) * (2 ** max(0, attempt)))
    return random.uniform(ceiling / 2, ceiling)


def not_before_delay(delay: float, retry_after: float | None, *, spread: float = 0.0) -> float:
    """``delay``, or longer when Brex asked to wait ``retry_after`` seconds: then a moment
    past it, drawn over ``spread`` seconds (5 s at least) so that the callers Brex held
    back together do not all come back at the same instant."""
    if not retry_after:
        return delay
    return max(delay, float(retry_after) + random.uniform(0.5, max(5.0, spread)))


def jittered_waits(
    *,
    first: float,
    cap: float,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[int]:
    """Wait for something another process is doing: each step sleeps a jittered pause
    (drawn around ``first``, doubling up to ``cap``) and then yields its number (1, 2, ...),
    so the caller looks again; the steps end once ``timeout`` seconds have passed.

    For polling a lock someone else holds (the refresh claim, the client-credentials
    fetch)::

        for _ in jittered_waits(first=0.05, cap=0.5, timeout=30):
            if look_again():
                break
        else:
            ...  # still not done after 30 s
    """
    deadline = time.monotonic() + timeout
    pause = first
    step = 0
    while time.monotonic() <= deadline:
        sleep(pause * random.uniform(0.5, 1.5))
        pause = min(pause * 2, cap)
        step += 1
        yield step
