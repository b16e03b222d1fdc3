"""Where the time of a dump or restore goes: one debug line per step.

    pid 1234: phase fds took 0.4 ms (12 fds)

`bench/tree.py` adds them up by phase name, so names carry no numbers.
A step is a part of a phase summed over its objects, on a line of its own
that phase sums skip:

    pid 1234: step tcp steal took 1.2 ms (100 sockets)
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("migrate.phases")


class Phases:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t = time.perf_counter()

    def __call__(self, what: str, detail: str = "") -> None:
        now = time.perf_counter()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("pid %d: phase %s took %.3f ms%s", self.pid, what, (now - self.t) * 1000,
                      f" ({detail})" if detail else "")
        self.t = now

    def step(self, what: str, seconds: float, detail: str = "") -> None:
        """Log a step of a phase already timed, ``seconds`` summed over its
        objects (bench/tcp.py); the phase clock is not touched."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("pid %d: step %s took %.3f ms%s", self.pid, what, seconds * 1000,
                      f" ({detail})" if detail else "")
