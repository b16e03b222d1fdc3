"""Page ranges and parent chains: pure arithmetic on pagemap entries.

A pagemap entry covers [vaddr, vaddr + nr_pages * 4096) with a flag:
PE_PRESENT (the data is in this image's page file, in entry order),
PE_IN_PARENT (the data is in the parent image, or further up the chain),
PE_ZERO (the page reads as zero: nothing stored).  ``resolve`` follows a chain
and says, for every image, which of its stored pages a restore needs.
"""

from __future__ import annotations

from typing import NamedTuple

from migrate.errors import ImageError

PAGE = 4096
PE_PRESENT, PE_IN_PARENT, PE_LAZY, PE_ZERO = 1, 2, 4, 8

Range = tuple[int, int]   # [start, end) in bytes


class Entry(NamedTuple):
    """One pagemap entry as read from an image (the fields of pagemap_entry;
    records hold them packed: see pagemap.proto)."""
    vaddr: int
    nr_pages: int
    flags: int


def normalize(ranges) -> list[Range]:
    """Sorted, merged, empty ranges dropped.  (These run over tens of
    thousands of scattered dirty ranges in a migration's downtime: plain
    comparisons and local names, no min/max calls.)"""
    rs = sorted(r for r in ranges if r[1] > r[0])
    if not rs:
        return []
    out: list[Range] = []
    append = out.append
    cs, ce = rs[0]
    for s, e in rs:
        if s <= ce:
            if e > ce:
                ce = e
        else:
            append((cs, ce))
            cs, ce = s, e
    append((cs, ce))
    return out


def intersect(a: list[Range], b: list[Range]) -> list[Range]:
    """a ∩ b, both normalized."""
    out: list[Range] = []
    append = out.append
    i = j = 0
    na, nb = len(a), len(b)
    while i < na and j < nb:
        a0, a1 = a[i]
        b0, b1 = b[j]
        s = a0 if a0 > b0 else b0
        e = a1 if a1 < b1 else b1
        if s < e:
            append((s, e))
        if a1 < b1:
            i += 1
        else:
            j += 1
    return out


def subtract(a: list[Range], b: list[Range]) -> list[Range]:
    """a \\ b, both normalized."""
    out: list[Range] = []
    append = out.append
    j, nb = 0, len(b)
    for s, e in a:
        cur = s
        while j < nb and b[j][1] <= cur:
            j += 1
        k = j
        while k < nb:
            b0, b1 = b[k]
            if b0 >= e:
                break
            if b0 > cur:
                append((cur, b0))
            if b1 > cur:
                cur = b1
            k += 1
        if cur < e:
            append((cur, e))
    return out


def union(a: list[Range], b: list[Range]) -> list[Range]:
    return normalize(list(a) + list(b))


def pages(ranges: list[Range]) -> int:
    return sum(e - s for s, e in ranges) // PAGE


def ranges_of(entries, flag: int | None = None) -> list[Range]:
    """Ranges of the entries (with ``flag`` set, or all)."""
    return normalize((e.vaddr, e.vaddr + e.nr_pages * PAGE) for e in entries
                     if flag is None or e.flags & flag)


def _present_index(entries) -> list[tuple[int, int, int]]:
    """(start, end, first page index in the page file) of PRESENT entries."""
    out, idx = [], 0
    for e in entries:
        if e.flags & PE_PRESENT:
            out.append((e.vaddr, e.vaddr + e.nr_pages * PAGE, idx))
            idx += e.nr_pages
    out.sort()
    return out


def _file_pieces(ranges: list[Range], present: list[tuple[int, int, int]]
                 ) -> list[tuple[int, int, int]]:
    """(file page index, vaddr, nr_pages) of the ``ranges`` (inside stored
    PRESENT entries ``present``, both sorted: one pass)."""
    out, j = [], 0
    for s, e in ranges:
        while j < len(present) and present[j][1] <= s:
            j += 1
        k = j
        while k < len(present) and present[k][0] < e:
            ps, pe, idx = present[k]
            a, b = max(s, ps), min(e, pe)
            if a < b:
                out.append((idx + (a - ps) // PAGE, a, (b - a) // PAGE))
            k += 1
    return out


def resolve(chain: list[list], names: list[str] | None = None) -> list[list[tuple[int, int, int]]]:
    """For an image and its parents (``chain[0]`` is the image restored), the
    stored pages each level must provide: ``[(file page index, vaddr,
    nr_pages), ...]`` per level, sorted by file index.  A page marked
    IN_PARENT that no parent stores is an ImageError.

    One sweep over the entries of every level (not level by level: after
    many pre-copy rounds of scattered dirty pages, what is still to find
    is split into thousands of pieces, and going over them once per level
    took seconds).  At each stretch of addresses, the level that provides
    it is the first one, from the top, that does not say "in parent"; it
    must store it."""
    names = names or [f"image {i}" for i in range(len(chain))]
    out: list[list[tuple[int, int, int]]] = [[] for _ in chain]
    if not chain:
        return out
    # (address, order, level, kind, idx): ends (order 0) before starts (1)
    events = []
    for level, entries in enumerate(chain):
        idx = 0
        for e in entries:
            s, end = e.vaddr, e.vaddr + e.nr_pages * PAGE
            if e.flags & PE_PRESENT:
                events.append((s, 1, level, 1, idx))
                events.append((end, 0, level, 1, idx))
                idx += e.nr_pages
            elif e.flags & PE_IN_PARENT and e.nr_pages:
                events.append((s, 1, level, 2, 0))
                events.append((end, 0, level, 2, 0))
    events.sort()
    present = 0                       # bit per level: stores the stretch
    inparent = 0                      # bit per level: leaves it to its parent
    start_of: dict[int, tuple[int, int]] = {}      # level -> (vaddr, file index)
    deepest = len(chain)
    i, n = 0, len(events)
    while i < n:
        pos = events[i][0]
        while i < n and events[i][0] == pos:
            _, order, level, kind, idx = events[i]
            bit = 1 << level
            if kind == 1:
                if order:
                    present |= bit
                    start_of[level] = (pos, idx)
                else:
                    present &= ~bit
            elif order:
                inparent |= bit
            else:
                inparent &= ~bit
            i += 1
        if i >= n:
            break
        if not (present | inparent) & 1:
            continue                  # not in the image restored
        nxt = events[i][0]
        # first level that does not pass the stretch on to its parent
        stop = ((present | ~inparent) & -(present | ~inparent)).bit_length() - 1
        if stop >= deepest:
            raise ImageError(f"pagemap of {names[-1]}", None,
                             f"page {pos:#x} is marked in parent but the chain ends here "
                             f"({(nxt - pos) // PAGE} pages)")
        if not present >> stop & 1:
            raise ImageError(f"pagemap of {names[stop]}", None,
                             f"page {pos:#x} is needed but neither stored nor in a parent "
                             f"({(nxt - pos) // PAGE} pages missing)")
        ps, pidx = start_of[stop]
        fidx = pidx + (pos - ps) // PAGE
        lst = out[stop]
        if lst and lst[-1][1] + lst[-1][2] * PAGE == pos and lst[-1][0] + lst[-1][2] == fidx:
            lst[-1] = (lst[-1][0], lst[-1][1], lst[-1][2] + (nxt - pos) // PAGE)
        else:
            lst.append((fidx, pos, (nxt - pos) // PAGE))
    for lst in out:
        lst.sort()
    return out


class Level:
    """One image's pagemap entries, with what the chain arithmetic derives
    from them computed once (a migration's destination checks the same
    pre-copy levels again at every stop)."""

    __slots__ = ("entries", "_present", "_present_ranges", "_inparent", "_cover", "parent_ok")

    def __init__(self, entries) -> None:
        self.entries = entries
        self._present = self._present_ranges = self._inparent = self._cover = None
        self.parent_ok = None      # the Level found to cover all our "in parent" pages

    @property
    def present(self) -> list[tuple[int, int, int]]:
        if self._present is None:
            self._present = _present_index(self.entries)
        return self._present

    @property
    def present_ranges(self) -> list[Range]:
        if self._present_ranges is None:
            self._present_ranges = normalize((s, e) for s, e, _ in self.present)
        return self._present_ranges

    @property
    def inparent(self) -> list[Range]:
        if self._inparent is None:
            self._inparent = ranges_of(self.entries, PE_IN_PARENT)
        return self._inparent

    @property
    def cover(self) -> list[Range]:
        if self._cover is None:
            self._cover = ranges_of(self.entries, PE_PRESENT | PE_IN_PARENT)
        return self._cover


_levels: dict | None = None     # id(decoded records) -> (records, Level), once enabled


def enable_cache() -> None:
    global _levels
    if _levels is None:
        _levels = {}


def level_of(records) -> Level:
    """The Level of a pagemap image's decoded records (head first); kept
    for the same records object once ``enable_cache`` was called."""
    if _levels is None:
        return Level(records[1:])
    hit = _levels.get(id(records))
    if hit is None or hit[0] is not records:
        hit = _levels[id(records)] = (records, Level(records[1:]))
    return hit[1]


def _level(x) -> Level:
    return x if isinstance(x, Level) else Level(x)


def check_chain(chain: list[list], names: list[str] | None = None) -> None:
    """Every page the image (``chain[0]``) needs is stored somewhere down
    the chain, or ImageError: each level's "in parent" pages (those the image
    needs) lie within what the next level covers, and the last level leaves
    nothing to a parent.  Linear in the entries, unlike ``resolve``."""
    names = names or [f"image {i}" for i in range(len(chain))]
    if not chain:
        return
    chain = [_level(x) for x in chain]
    needed = chain[0].cover
    for level, lv in enumerate(chain):
        if not lv.inparent:
            continue
        if level + 1 < len(chain) and lv.parent_ok is chain[level + 1]:
            continue                   # checked before (a migration's earlier stop)
        if level + 1 < len(chain) and not subtract(lv.inparent, chain[level + 1].cover):
            lv.parent_ok = chain[level + 1]
            continue
        ip = intersect(lv.inparent, needed)
        if not ip:
            continue
        if level + 1 == len(chain):
            s, _ = ip[0]
            raise ImageError(f"pagemap of {names[level]}", None,
                             f"page {s:#x} is marked in parent but the chain ends here "
                             f"({pages(ip)} pages)")
        missing = subtract(ip, chain[level + 1].cover)
        if missing:
            s, _ = missing[0]
            raise ImageError(f"pagemap of {names[level + 1]}", None,
                             f"page {s:#x} is needed but neither stored nor in a parent "
                             f"({pages(missing)} pages missing)")


def overlay(chain: list[list], names: list[str] | None = None
            ) -> list[list[tuple[int, int, int]]]:
    """Like ``resolve`` (and checked by it), but each level provides every
    page it stores that the image covers, superseded or not: written from
    the deepest level up, later levels overwrite earlier ones, and each
    level's pages stay in long contiguous runs.  Costs the superseded pages
    once more; saves a fragmented copy of the whole base image."""
    chain = [_level(x) for x in chain]
    check_chain(chain, names)                  # every page is somewhere: or ImageError
    covered = chain[0].cover if chain else []
    out: list[list[tuple[int, int, int]]] = []
    for lv in chain:
        wanted = intersect(lv.present_ranges, covered)
        parts = sorted(_file_pieces(wanted, lv.present))
        out.append(parts)
    return out


def overlay_within(chain: list, within: list[Range], names: list[str] | None = None,
                   check: bool = True) -> list[list[tuple[int, int, int]]]:
    """``overlay`` of only the pages inside ``within`` (normalized, a few
    ranges: the pages a lazy restore writes itself), found by bisection in
    each level's stored pages instead of a pass over all of them.
    ``check``: False when the chain was checked already."""
    import bisect
    chain = [_level(x) for x in chain]
    if check:
        check_chain(chain, names)
    wanted = intersect(chain[0].cover, within) if chain else []
    out: list[list[tuple[int, int, int]]] = []
    for lv in chain:
        present = lv.present
        starts = [p[0] for p in present] if len(wanted) else []
        parts = []
        for s, e in wanted:
            i = max(bisect.bisect_right(starts, s) - 1, 0)
            while i < len(present) and present[i][0] < e:
                ps, pe, idx = present[i]
                a, b = max(s, ps), min(e, pe)
                if a < b:
                    parts.append((idx + (a - ps) // PAGE, a, (b - a) // PAGE))
                i += 1
        out.append(sorted(parts))
    return out


def parts_outside(parts: list[tuple[int, int, int]], skip: list[Range]
                  ) -> list[tuple[int, int, int]]:
    """The (file index, vaddr, nr_pages) pieces of ``parts`` (one level's,
    sorted) outside the normalized ranges ``skip``, still sorted by index."""
    if not skip:
        return parts
    out = []
    j = 0
    for idx, addr, n in sorted(parts, key=lambda p: p[1]):
        end = addr + n * PAGE
        while j < len(skip) and skip[j][1] <= addr:
            j += 1
        cur, k = addr, j
        while k < len(skip) and skip[k][0] < end:
            if skip[k][0] > cur:
                out.append((idx + (cur - addr) // PAGE, cur, (skip[k][0] - cur) // PAGE))
            cur = max(cur, skip[k][1])
            k += 1
        if cur < end:
            out.append((idx + (cur - addr) // PAGE, cur, (end - cur) // PAGE))
    out.sort()
    return out


def to_entries(ranges_flags: list[tuple[int, int, int]], entry_cls=Entry) -> list:
    """pagemap entries from (start, end, flags), merging neighbours with equal flags."""
    starts: list[int] = []
    ends: list[int] = []
    flags: list[int] = []
    last_end, last_fl = -1, None
    for s, e, fl in sorted(ranges_flags):
        if s == last_end and fl == last_fl:
            ends[-1] = e
        else:
            starts.append(s)
            ends.append(e)
            flags.append(fl)
            last_fl = fl
        last_end = e
    return [entry_cls(s, (e - s) // PAGE, fl) if entry_cls is Entry
            else entry_cls(vaddr=s, nr_pages=(e - s) // PAGE, flags=fl)
            for s, e, fl in zip(starts, ends, flags)]
