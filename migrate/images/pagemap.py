"""Page ranges and parent chains: pure arithmetic on pagemap entries.

A pagemap entry covers [vaddr, vaddr + nr_pages * 4096) with a flag:
PE_PRESENT (the data is in this image's page file, in entry order),
PE_IN_PARENT (the data is in the parent image, or further up the chain),
PE_ZERO (the page reads as zero: nothing stored).  ``resolve`` follows a chain
and says, for every image, which of its stored pages a restore needs.
"""

from __future__ import annotations

from migrate.errors import ImageError

PAGE = 4096
PE_PRESENT, PE_IN_PARENT, PE_LAZY, PE_ZERO = 1, 2, 4, 8

Range = tuple[int, int]   # [start, end) in bytes


def normalize(ranges) -> list[Range]:
    """Sorted, merged, empty ranges dropped."""
    out: list[list[int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def intersect(a: list[Range], b: list[Range]) -> list[Range]:
    """a ∩ b, both normalized."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a: list[Range], b: list[Range]) -> list[Range]:
    """a \\ b, both normalized."""
    out, j = [], 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
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


def overlay(chain: list[list], names: list[str] | None = None
            ) -> list[list[tuple[int, int, int]]]:
    """Like ``resolve`` (and checked by it), but each level provides every
    page it stores that the image covers, superseded or not: written from
    the deepest level up, later levels overwrite earlier ones, and each
    level's pages stay in long contiguous runs.  Costs the superseded pages
    once more; saves a fragmented copy of the whole base image."""
    resolve(chain, names)                      # every page is somewhere: or ImageError
    covered = ranges_of(chain[0], PE_PRESENT | PE_IN_PARENT) if chain else []
    out: list[list[tuple[int, int, int]]] = []
    for entries in chain:
        present = _present_index(entries)
        wanted = intersect(normalize((s, e) for s, e, _ in present), covered)
        parts = sorted(_file_pieces(wanted, present))
        out.append(parts)
    return out


def to_entries(ranges_flags: list[tuple[int, int, int]], entry_cls) -> list:
    """pagemap entries from (start, end, flags), merging neighbours with equal flags."""
    out = []
    for s, e, fl in sorted(ranges_flags):
        if out and out[-1].flags == fl and out[-1].vaddr + out[-1].nr_pages * PAGE == s:
            out[-1].nr_pages += (e - s) // PAGE
        else:
            out.append(entry_cls(vaddr=s, nr_pages=(e - s) // PAGE, flags=fl))
    return out
