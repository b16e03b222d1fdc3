"""Chain logic: range arithmetic and resolving IN_PARENT pages up a chain."""

import pytest
from hypothesis import given, settings, strategies as st

from migrate.errors import ImageError
from migrate.images import pagemap as pm
from migrate.images._pb import pagemap_pb2

P = pm.PAGE


def E(vaddr_page, n, flags):
    return pagemap_pb2.pagemap_entry(vaddr=vaddr_page * P, nr_pages=n, flags=flags)


def R(a, b):
    return (a * P, b * P)


def test_range_ops():
    a = pm.normalize([R(0, 4), R(3, 6), R(10, 12), R(7, 7)])
    assert a == [R(0, 6), R(10, 12)]
    b = [R(2, 11)]
    assert pm.intersect(a, b) == [R(2, 6), R(10, 11)]
    assert pm.subtract(a, b) == [R(0, 2), R(11, 12)]
    assert pm.union(a, b) == [R(0, 12)]
    assert pm.pages(a) == 8


pages_set = st.sets(st.integers(0, 200), max_size=80)


def _ranges(s):
    return pm.normalize((R(p, p + 1) for p in s))


@settings(max_examples=300, deadline=None)
@given(pages_set, pages_set)
def test_range_ops_match_sets(a, b):
    ra, rb = _ranges(a), _ranges(b)
    assert pm.intersect(ra, rb) == _ranges(a & b)
    assert pm.subtract(ra, rb) == _ranges(a - b)
    assert pm.union(ra, rb) == _ranges(a | b)


def test_resolve_chain():
    base = [E(0, 10, pm.PE_PRESENT)]                                  # file 0..9
    mid = [E(0, 2, pm.PE_IN_PARENT), E(2, 2, pm.PE_PRESENT),          # file 0..1
           E(4, 6, pm.PE_IN_PARENT)]
    top = [E(0, 3, pm.PE_IN_PARENT), E(3, 1, pm.PE_PRESENT),          # file 0
           E(4, 5, pm.PE_IN_PARENT), E(20, 2, pm.PE_PRESENT)]         # file 1..2
    parts = pm.resolve([top, mid, base])
    assert parts[0] == [(0, 3 * P, 1), (1, 20 * P, 2)]
    assert parts[1] == [(0, 2 * P, 1)]                 # page 2 from mid (file index 0)
    assert parts[2] == [(0, 0, 2), (4, 4 * P, 5)]       # pages 0-1 and 4-8 from base
    # every page of top is provided exactly once
    got = pm.normalize((a, a + n * P) for lvl in parts for _, a, n in lvl)
    assert got == pm.ranges_of(top)


def test_resolve_missing_page_is_an_error():
    base = [E(0, 2, pm.PE_PRESENT)]
    top = [E(0, 4, pm.PE_IN_PARENT)]
    with pytest.raises(ImageError, match="0x2000"):
        pm.resolve([top, base], ["top", "base"])
    with pytest.raises(ImageError, match="chain ends"):
        pm.resolve([top], ["top"])


def test_to_entries_merges_neighbours():
    out = pm.to_entries([(0, P, 1), (P, 3 * P, 1), (3 * P, 4 * P, 2), (8 * P, 9 * P, 2)],
                        pagemap_pb2.pagemap_entry)
    assert [(e.vaddr // P, e.nr_pages, e.flags) for e in out] == [(0, 3, 1), (3, 1, 2),
                                                                   (8, 1, 2)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(pages_set, pages_set), min_size=1, max_size=5))
def test_resolve_random_chains(levels):
    """Build a chain where each level stores some pages and leaves the rest of
    what it covers to its parent; resolve must hand out every covered page
    exactly once, from the nearest level that stores it."""
    chain, covered = [], set()
    # from base (last) to top (first)
    for stored, extra in reversed(levels):
        inparent = (covered | (extra & covered)) - stored
        entries = pm.to_entries([(p * P, (p + 1) * P, pm.PE_PRESENT) for p in sorted(stored)]
                                + [(p * P, (p + 1) * P, pm.PE_IN_PARENT) for p in inparent],
                                pagemap_pb2.pagemap_entry)
        chain.insert(0, entries)
        covered = stored | inparent
    parts = pm.resolve(chain)
    seen = []
    for lvl in parts:
        for _, a, n in lvl:
            seen.extend(range(a // P, a // P + n))
    assert sorted(seen) == sorted(covered) and len(seen) == len(set(seen))


def test_overlay_writes_deepest_first_and_ends_like_resolve():
    base = [E(0, 10, pm.PE_PRESENT)]
    mid = [E(0, 2, pm.PE_IN_PARENT), E(2, 2, pm.PE_PRESENT), E(4, 6, pm.PE_IN_PARENT)]
    top = [E(0, 3, pm.PE_IN_PARENT), E(3, 1, pm.PE_PRESENT), E(4, 5, pm.PE_IN_PARENT)]
    parts = pm.overlay([top, mid, base])
    assert parts[2] == [(0, 0, 9)]            # base: one run, pages 0-8 (9 is not covered)
    assert parts[1] == [(0, 2 * P, 2)]        # mid: pages 2-3, page 3 superseded by top
    assert parts[0] == [(0, 3 * P, 1)]
    # applying deepest first gives what resolve says
    final = {}
    for level in (2, 1, 0):
        for idx, a, n in parts[level]:
            for k in range(n):
                final[a // P + k] = (level, idx + k)
    want = {}
    for level, lst in enumerate(pm.resolve([top, mid, base])):
        for idx, a, n in lst:
            for k in range(n):
                want[a // P + k] = (level, idx + k)
    assert final == want


def _resolve_by_levels(chain: list[list], names: list[str] | None = None) -> list[list[tuple[int, int, int]]]:
    """The level-by-level resolution resolve() replaced (one pass over what
    is left per level): the reference its sweep must agree with."""
    names = names or [f"image {i}" for i in range(len(chain))]
    out: list[list[tuple[int, int, int]]] = [[] for _ in chain]
    todo = pm.ranges_of(chain[0], pm.PE_PRESENT | pm.PE_IN_PARENT) if chain else []
    for level, entries in enumerate(chain):
        if not todo:
            break
        present = pm._present_index(entries)
        pres_ranges = pm.normalize((s, e) for s, e, _ in present)
        here = pm.intersect(todo, pres_ranges)
        out[level].extend(pm._file_pieces(here, present))
        rest = pm.subtract(todo, here)
        inparent = pm.ranges_of(entries, pm.PE_IN_PARENT)
        missing = pm.subtract(rest, inparent)
        if missing:
            s, _ = missing[0]
            raise ImageError(f"pagemap of {names[level]}", None,
                             f"page {s:#x} is needed but neither stored nor in a parent "
                             f"({pm.pages(missing)} pages missing)")
        todo = rest
    if todo:
        s, _ = todo[0]
        raise ImageError(f"pagemap of {names[-1]}", None,
                         f"page {s:#x} is marked in parent but the chain ends here "
                         f"({pm.pages(todo)} pages)")
    for lst in out:
        lst.sort()
    return out


flags_set = st.sampled_from([pm.PE_PRESENT, pm.PE_IN_PARENT, 0])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 8), flags_set),
                         max_size=12), min_size=1, max_size=6))
def test_resolve_sweep_agrees_with_levels(levels):
    """Any chain, well formed or not: the sweep gives exactly what the
    level-by-level resolution gives, or fails where it fails."""
    chain = []
    for ents in levels:
        pages = {}
        for start, n, fl in ents:          # later entries win: one flag a page
            for p in range(start, start + n):
                pages[p] = fl
        chain.append(pm.to_entries([(p * P, (p + 1) * P, fl) for p, fl in pages.items()
                                    if fl], pagemap_pb2.pagemap_entry))
    try:
        want = _resolve_by_levels(chain)
    except ImageError:
        # (each may name another of the missing pages first)
        with pytest.raises(ImageError, match="neither stored|chain ends"):
            pm.resolve(chain)
        return
    assert pm.resolve(chain) == want


def test_parts_outside():
    P = pm.PAGE
    parts = [(0, 10 * P, 4), (4, 20 * P, 3), (7, 30 * P, 1)]
    assert pm.parts_outside(parts, []) == parts
    assert pm.parts_outside(parts, [(11 * P, 12 * P), (13 * P, 21 * P), (30 * P, 31 * P)]) \
        == [(0, 10 * P, 1), (2, 12 * P, 1), (5, 21 * P, 2)]
    assert pm.parts_outside(parts, [(0, 40 * P)]) == []


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 6)), max_size=8),
       st.lists(st.tuples(st.integers(0, 50), st.integers(1, 6)), max_size=6))
@settings(max_examples=200, deadline=None)
def test_parts_outside_matches_sets(raw_parts, raw_skip):
    P = pm.PAGE
    parts, idx, used = [], 0, set()
    for a, n in sorted(raw_parts):
        pages_ = set(range(a, a + n))
        if pages_ & used:
            continue
        used |= pages_
        parts.append((idx, a * P, n))
        idx += n
    skip = pm.normalize((a * P, (a + n) * P) for a, n in raw_skip)
    skipped = {p for s, e in skip for p in range(s // P, e // P)}
    want = {(i + k, (a // P) + k) for i, a, n in parts for k in range(n)
            if (a // P) + k not in skipped}
    got = pm.parts_outside(parts, skip)
    assert {(i + k, a // P + k) for i, a, n in got for k in range(n)} == want
    assert got == sorted(got)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.sampled_from([1, 2, 3]), st.booleans()),
                min_size=1, max_size=12),
       st.lists(st.tuples(st.integers(0, 60), st.integers(1, 8),
                          st.sampled_from([1, 2, 3, None])), max_size=6))
def test_lazy_map_overlay_matches_a_page_model(shape, over):
    """dump._overlay (the post-copy map's changes since the pre-scan): every
    page gets the override's kind where one covers it, or goes (None)."""
    from migrate.source.dump import _overlay
    P = 4096
    runs, model, a = [], {}, 0
    for n, kind, gap in shape:
        a += P if gap else 0
        runs.append((a, n, kind))
        for i in range(n):
            model[a // P + i] = kind
        a += n * P
    ranges, taken = [], set()
    for s, n, k in sorted(over, key=lambda o: o[:2]):
        pages = set(range(s, s + n))
        if pages & taken:
            continue
        taken |= pages
        ranges.append((s * P, (s + n) * P, k))
        for p in pages:
            if p in model:
                if k is None:
                    del model[p]
                else:
                    model[p] = k
    out = _overlay(runs, ranges)
    got = {}
    for a, n, k in out:
        assert n > 0
        for i in range(n):
            assert a // P + i not in got
            got[a // P + i] = k
    assert got == model
    assert [r[0] for r in out] == sorted(r[0] for r in out)
