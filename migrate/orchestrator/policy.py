"""When to stop pre-copy: the convergence policy of `migrate run`.

Pure logic, no I/O: the orchestrator feeds one ``RoundStats`` per pre-copy
round to ``Policy.after_round()`` and gets a ``Decision`` back.  The model is
QEMU's pre-copy (qapi/migration.json; its parameter names in brackets).

Estimates, after every round:
- *bandwidth*: bytes sent over the last ``BANDWIDTH_ROUNDS`` rounds divided by
  their wall time (so a tiny round does not swing it), capped by
  ``max_bandwidth`` [max-bandwidth].  These are bytes on the wire: with
  compression the prediction below is pessimistic.
- *dirty rate*: the bytes the process dirtied per second while the round ran:
  ``dirty_bytes_left / seconds`` when the orchestrator knows what is left,
  else the dirty set found at the start of this round over the previous
  round's time (the round before the first has none: unknown).
- *bytes left*: ``dirty_bytes_left`` if known, else dirty rate x this round's
  time, else (first round) the whole set this round copied (no shrink assumed).
- *predicted downtime* = bytes left / bandwidth + ``stop_cost`` (the fixed cost
  of the stop phase: freeze, state, restore; ``observe_stop_cost()`` updates it).

Rules, in this order (rounds are counted by the policy, from 1):
1. Converged: predicted downtime <= ``downtime_limit`` [downtime-limit, default
   300 ms] once ``min_rounds`` rounds are done -> stop.
2. Round cap: ``max_rounds`` rounds done -> give up pre-copy.
3. Auto-converge [capability auto-converge]: a round is *hot* when the process
   dirties faster than ``throttle_trigger`` x bandwidth
   [throttle-trigger-threshold, 50 %].  After two hot rounds in a row (as QEMU),
   or when the dirty set stalls (rule 4), raise the CPU throttle: first
   ``throttle_initial`` [cpu-throttle-initial, 20 %], then by
   ``throttle_increment`` [cpu-throttle-increment, 10 %] up to ``throttle_max``
   [max-cpu-throttle, 99 %], and keep copying: a raised throttle restarts the
   stall count, so pre-copy gives up only once the throttle is at its maximum.
4. Stalled: the dirty set (what each round had to copy) has not shrunk by
   ``min_shrink`` (10 %) below its best for ``stall_rounds`` (3) rounds -> give up
   pre-copy.
5. Else continue.

Giving up (rules 2 and 4) means "stop" (the rest is copied with the process
frozen, over the limit), or "post-copy" with ``post_copy`` "on" or "auto"
[capability postcopy-ram]: the process resumes on the destination and the
rest follows on demand.  With "on" a converged pre-copy also ends in
"post-copy" (what is left goes by post-copy; ours, unlike QEMU, does not wait
for a migrate-start-postcopy command).
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import re

PAGE_SIZE = mmap.PAGESIZE
BANDWIDTH_ROUNDS = 3
POST_COPY_MODES = ("off", "on", "auto")


@dataclasses.dataclass(frozen=True, slots=True)
class RoundStats:
    """One pre-copy round as the orchestrator saw it."""
    round: int                # the orchestrator's number (for logs; the policy counts its own)
    bytes_sent: int           # on the wire, headers included
    pages_sent: int
    pages_dirty: int          # dirty at the start of the round: what it had to copy
    seconds: float            # wall time of the round
    dirty_bytes_left: int | None = None   # dirty after the round, if the tracker told


@dataclasses.dataclass(slots=True)
class PolicyConfig:
    downtime_limit: float = 0.3           # s [downtime-limit]
    max_rounds: int = 30
    min_rounds: int = 1
    auto_converge: bool = False           # [auto-converge]
    post_copy: str = "off"                # "off", "on", "auto" [postcopy-ram]
    max_bandwidth: float | None = None    # bytes/s [max-bandwidth]
    stop_cost: float = 0.05               # s, assumed until observe_stop_cost()
    stall_rounds: int = 3
    min_shrink: float = 0.10              # fraction the dirty set must shrink by
    throttle_trigger: float = 0.5         # [throttle-trigger-threshold] / 100
    throttle_initial: int = 20            # % [cpu-throttle-initial]
    throttle_increment: int = 10          # % [cpu-throttle-increment]
    throttle_max: int = 99                # % [max-cpu-throttle]

    def __post_init__(self) -> None:
        if self.post_copy not in POST_COPY_MODES:
            raise ValueError(f"post_copy {self.post_copy!r}: one of {', '.join(POST_COPY_MODES)}")
        if not 1 <= self.min_rounds <= self.max_rounds:
            raise ValueError(f"rounds: need 1 <= min_rounds ({self.min_rounds}) <= "
                             f"max_rounds ({self.max_rounds})")
        if self.downtime_limit < 0 or self.stop_cost < 0:
            raise ValueError("downtime_limit and stop_cost must be >= 0")
        if self.max_bandwidth is not None and self.max_bandwidth <= 0:
            raise ValueError(f"max_bandwidth {self.max_bandwidth}: must be > 0")
        if not 0 < self.throttle_initial <= self.throttle_max <= 99 or \
                self.throttle_increment <= 0:
            raise ValueError("throttle: need 0 < initial <= max <= 99 and increment > 0")


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    action: str                    # "continue", "stop" or "post-copy"
    reason: str
    predicted_downtime: float      # s, >= 0 (inf with no bandwidth measured)
    bandwidth: float               # bytes/s
    dirty_rate: float | None       # bytes/s, None while unknown
    throttle: int | None           # CPU % to take away (auto-converge), None: none


class Policy:
    """Feed ``after_round()`` once per round until it says other than "continue"."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.stop_cost = self.config.stop_cost
        self.rounds = 0
        self.throttle: int | None = None
        self._window: list[tuple[int, float]] = []     # (bytes, seconds) of the last rounds
        self._prev_seconds: float | None = None
        self._best: int | None = None                  # smallest dirty set so far
        self._since_best = 0
        self._hot = 0                                  # hot rounds in a row
        self._stop_costs = 0
        self.done: Decision | None = None

    def observe_stop_cost(self, seconds: float) -> None:
        """A measured stop-phase cost: the first replaces the assumed one, later
        ones are averaged in (EWMA, weight 1/2)."""
        if seconds < 0:
            raise ValueError(f"stop cost {seconds} s")
        self.stop_cost = seconds if not self._stop_costs else (self.stop_cost + seconds) / 2
        self._stop_costs += 1

    # -- estimates -------------------------------------------------------------
    def _bandwidth(self, s: RoundStats) -> float:
        self._window = (self._window + [(max(0, s.bytes_sent), max(0.0, s.seconds))])[
            -BANDWIDTH_ROUNDS:]
        nbytes = sum(b for b, _ in self._window)
        secs = sum(t for _, t in self._window)
        bw = nbytes / secs if secs > 0 else (math.inf if nbytes else 0.0)
        cap = self.config.max_bandwidth
        return min(bw, cap) if cap is not None else bw

    def _dirty_rate(self, s: RoundStats) -> float | None:
        if s.dirty_bytes_left is not None and s.seconds > 0:
            return max(0, s.dirty_bytes_left) / s.seconds
        if self._prev_seconds:
            return max(0, s.pages_dirty) * PAGE_SIZE / self._prev_seconds
        return None

    def _left(self, s: RoundStats, dirty_rate: float | None) -> float:
        if s.dirty_bytes_left is not None:
            return max(0, s.dirty_bytes_left)
        if dirty_rate is not None:
            # (a round of no time dirtied nothing, whatever the rate: inf * 0)
            return dirty_rate * s.seconds if s.seconds > 0 else 0.0
        return max(0, s.pages_dirty) * PAGE_SIZE

    def _stalled(self, dirty: int) -> bool:
        """Count the rounds since the dirty set last shrank by min_shrink."""
        if self._best is None or dirty <= self._best * (1 - self.config.min_shrink):
            self._best = dirty
            self._since_best = 0
        else:
            self._since_best += 1
        return self._since_best >= self.config.stall_rounds

    def _raise_throttle(self) -> bool:
        c = self.config
        if self.throttle is None:
            self.throttle = c.throttle_initial
        elif self.throttle < c.throttle_max:
            self.throttle = min(c.throttle_max, self.throttle + c.throttle_increment)
        else:
            return False
        self._since_best = 0      # give the new throttle its rounds
        self._hot = 0
        return True

    # -- the decision ----------------------------------------------------------
    def after_round(self, stats: RoundStats) -> Decision:
        if self.done is not None:
            raise ValueError(f"pre-copy already ended: {self.done.reason}")
        c = self.config
        self.rounds += 1
        bw = self._bandwidth(stats)
        rate = self._dirty_rate(stats)
        left = self._left(stats, rate)
        if left == 0:
            predicted = self.stop_cost
        elif bw > 0:
            predicted = left / bw + self.stop_cost
        else:
            predicted = math.inf
        self._prev_seconds = stats.seconds if stats.seconds > 0 else None
        stalled = self._stalled(max(0, stats.pages_dirty) * PAGE_SIZE)
        hot = rate is not None and rate > c.throttle_trigger * bw
        self._hot = self._hot + 1 if hot else 0

        def decide(action: str, reason: str) -> Decision:
            d = Decision(action, reason, predicted, bw, rate, self.throttle)
            if action != "continue":
                self.done = d
            return d

        lim = f"the {_ms(c.downtime_limit)} limit"
        if predicted <= c.downtime_limit and self.rounds >= c.min_rounds:
            return decide("post-copy" if c.post_copy == "on" else "stop",
                          f"predicted downtime {_ms(predicted)} under {lim}")
        give_up = "post-copy" if c.post_copy in ("on", "auto") else "stop"
        over = f"predicted downtime {_ms(predicted)} over {lim}"
        if left == 0 and self.rounds >= c.min_rounds:
            # Nothing dirtied: another round cannot shorten the stop, whose
            # own cost is over the limit (nor would post-copy).
            return decide("stop", f"nothing left to copy, {over}: the stop's own cost")
        if self.rounds >= c.max_rounds:
            return decide(give_up, f"round cap {c.max_rounds} reached, {over}")
        if c.auto_converge and (self._hot >= 2 or stalled):
            why = (f"dirtying {_rate(rate)} against {_rate(bw)} sent"
                   if self._hot >= 2 else
                   f"dirty set stopped shrinking ({self._since_best} rounds)")
            if self._raise_throttle():
                return decide("continue", f"{why}: CPU throttled by {self.throttle}%, {over}")
        if stalled:
            return decide(give_up, f"dirty set stopped shrinking ({self._since_best} "
                                   f"rounds), {over}")
        return decide("continue", over)


def _ms(seconds: float) -> str:
    return "inf ms" if math.isinf(seconds) else f"{seconds * 1000:.0f} ms"


def _rate(bps: float | None) -> str:
    if bps is None:
        return "? MiB/s"
    return "inf MiB/s" if math.isinf(bps) else f"{bps / 2**20:.1f} MiB/s"


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_RATE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?(?:/s)?", re.IGNORECASE)


def parse_rate(text: str) -> int:
    """Bytes/s from "50M", "1G", "1.5g", "512k", "100000" or "64MiB/s".  The
    suffixes are powers of 1024, as QEMU's max-bandwidth sizes."""
    m = _RATE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"bad rate {text!r}: a number of bytes/s with an optional "
                         "K, M, G or T suffix (powers of 1024)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"bad rate {text!r}: must be more than 0 bytes/s")
    return value
