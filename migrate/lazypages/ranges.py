"""Sets of page ranges that remember where their data comes from.

A process's missing pages are ranges of its current addresses, each with
the address the page had in the image (``src``): they differ once the
process mremaps a lazy area.  Pure arithmetic, no I/O.
"""

from __future__ import annotations

import bisect

PAGE = 4096


class RangeMap:
    """Disjoint [start, end) byte ranges, each with ``delta = src - start``."""

    def __init__(self, ranges=(), delta: int = 0) -> None:
        self._starts: list[int] = []
        self._items: list[list[int]] = []        # [start, end, delta]
        for s, e in sorted(ranges):
            if e > s:
                self._add(s, e, delta)

    # -- queries -------------------------------------------------------------
    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def pages(self) -> int:
        return sum(e - s for s, e, _ in self._items) // PAGE

    def items(self) -> list[tuple[int, int, int]]:
        """(start, end, src) of every range, in address order."""
        return [(s, e, s + d) for s, e, d in self._items]

    def src_of(self, addr: int) -> int | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._items[i][1]:
            return addr + self._items[i][2]
        return None

    def next_from(self, addr: int, max_len: int) -> tuple[int, int, int] | None:
        """The first range part at or after ``addr`` (wrapping around to the
        lowest address), at most ``max_len`` bytes: (start, end, src)."""
        if not self._items:
            return None
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._items[i][1]:
            s, e, d = addr, self._items[i][1], self._items[i][2]
        else:
            i += 1
            if i >= len(self._items):
                i = 0
            s, e, d = self._items[i]
        e = min(e, s + max_len)
        return s, e, s + d

    # -- changes -------------------------------------------------------------
    def _add(self, s: int, e: int, d: int) -> None:
        i = bisect.bisect_left(self._starts, s)
        self._starts.insert(i, s)
        self._items.insert(i, [s, e, d])

    def pop(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Remove [start, end); return the parts that were in: (start, end, src)."""
        out = []
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while i < len(self._items):
            s, e, d = self._items[i]
            if s >= end:
                break
            if e <= start:
                i += 1
                continue
            a, b = max(s, start), min(e, end)
            out.append((a, b, a + d))
            del self._starts[i], self._items[i]
            if s < a:
                self._starts.insert(i, s)
                self._items.insert(i, [s, a, d])
                i += 1
            if b < e:
                self._starts.insert(i, b)
                self._items.insert(i, [b, e, d])
                i += 1
        return out

    def add(self, start: int, end: int, src: int) -> None:
        """Add [start, end) with data from ``src`` (replacing what was there)."""
        self.pop(start, end)
        self._add(start, end, src - start)

    def move(self, old: int, new: int, length: int) -> None:
        """mremap: what was at [old, old+length) is now at ``new``; what was
        at the new place is gone."""
        parts = self.pop(old, old + length)
        self.pop(new, new + length)
        for s, e, src in parts:
            ns = s - old + new
            self._add(ns, ns + (e - s), src - ns)

    def pop_src(self, src: int, end: int) -> list[tuple[int, int, int]]:
        """Remove and return the parts whose data is [src, end) of the image,
        wherever they are now: (start, end, src)."""
        return self.pop_src_ranges([(src, end)])

    def pop_src_ranges(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """``pop_src`` of many image ranges (sorted, disjoint) at once: one
        pass over the ranges held, a bisection each into ``ranges``."""
        if not ranges or not self._items:
            return []
        starts = [a for a, _ in ranges]
        cut = []
        for s, e, d in self._items:
            lo, hi = s + d, e + d
            i = max(bisect.bisect_right(starts, lo) - 1, 0)
            while i < len(ranges) and ranges[i][0] < hi:
                a, b = max(lo, ranges[i][0]), min(hi, ranges[i][1])
                if a < b:
                    cut.append((a - d, b - d))
                i += 1
        out = []
        for a, b in cut:
            out.extend(self.pop(a, b))
        return out

    def copy(self) -> "RangeMap":
        m = RangeMap()
        m._starts = list(self._starts)
        m._items = [list(x) for x in self._items]
        return m

    def update(self, other: "RangeMap") -> None:
        for s, e, src in other.items():
            self.add(s, e, src)
