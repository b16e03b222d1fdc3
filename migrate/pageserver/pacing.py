"""Pacing of the page-server client: --max-bandwidth (QEMU's max-bandwidth).

A token bucket shared by every stream of a session: each send takes its
bytes out of it and sleeps while the bucket is in debt, so the session as a
whole never goes faster than ``rate`` bytes/s over any stretch longer than
``burst / rate``.  Senders reserve under a lock and sleep outside it; debt
queues them in order, whichever thread they are.
"""

from __future__ import annotations

import threading
import time

SLICE = 256 << 10        # bytes sent per take(): a chunk (8 MiB) goes out smoothly
BURST_S = 0.05           # default burst: 50 ms worth of the rate
MIN_BURST = 64 << 10


class RateLimit:
    """``rate`` bytes/s, at most ``burst`` bytes ahead of it; ``clock`` and
    ``sleep`` are replaceable for tests."""

    def __init__(self, rate: float, burst: int | None = None, *, clock=time.monotonic,
                 sleep=time.sleep) -> None:
        if not rate > 0:
            raise ValueError(f"rate {rate} bytes/s: must be > 0")
        self.rate = float(rate)
        self.burst = burst if burst is not None else max(MIN_BURST, int(rate * BURST_S))
        if self.burst <= 0:
            raise ValueError(f"burst {burst}: must be > 0")
        self.clock, self.sleep = clock, sleep
        self.tokens = float(self.burst)       # a full bucket: the first burst goes at once
        self.last = clock()
        self.waited = 0.0                     # seconds slept, for the logs
        self.slice = min(SLICE, self.burst)
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` now; return how long to wait before sending them."""
        with self._lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= nbytes
            delay = -self.tokens / self.rate if self.tokens < 0 else 0.0
            self.waited += delay
            return delay

    def take(self, nbytes: int) -> None:
        """Block until ``nbytes`` may be sent."""
        delay = self.reserve(nbytes)
        if delay > 0:
            self.sleep(delay)
