"""The lazy-pages daemon's pure parts: range maps, uffd messages, the plan."""

import struct

from hypothesis import given, settings, strategies as st

from migrate.kernel import userfaultfd as U
from migrate.lazypages.ranges import PAGE, RangeMap

P = PAGE


def test_pop_splits_and_returns_sources():
    m = RangeMap([(0, 10 * P), (20 * P, 30 * P)])
    assert m.pop(5 * P, 22 * P) == [(5 * P, 10 * P, 5 * P), (20 * P, 22 * P, 20 * P)]
    assert m.items() == [(0, 5 * P, 0), (22 * P, 30 * P, 22 * P)]
    assert m.pages == 13


def test_move_keeps_the_source_and_drops_the_target():
    m = RangeMap([(0, 4 * P), (100 * P, 101 * P)])
    m.move(0, 100 * P, 4 * P)               # mremap over what was at the target
    assert m.items() == [(100 * P, 104 * P, 0)]
    assert m.src_of(102 * P) == 2 * P and m.src_of(P) is None
    assert m.pop_src(P, 2 * P) == [(101 * P, 102 * P, P)]


def test_pop_by_source_after_a_move_onto_a_zero_area():
    """The map's zero runs are in the source's addresses: after the data at
    0-4 moved onto 100-104 (a zero area at the source), dropping the source's
    zero range 100-104 must leave the moved data missing."""
    m = RangeMap([(0, 4 * P), (100 * P, 104 * P)])
    m.move(0, 100 * P, 4 * P)
    assert m.pop_src_ranges([(100 * P, 104 * P)]) == []
    assert m.items() == [(100 * P, 104 * P, 0)]
    assert m.pop_src_ranges([(P, 2 * P), (3 * P, 10 * P)]) == \
        [(101 * P, 102 * P, P), (103 * P, 104 * P, 3 * P)]


def test_next_from_wraps_and_is_bounded():
    m = RangeMap([(10 * P, 20 * P)])
    assert m.next_from(15 * P, 2 * P) == (15 * P, 17 * P, 15 * P)
    assert m.next_from(50 * P, 100 * P) == (10 * P, 20 * P, 10 * P)
    assert RangeMap().next_from(0, P) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("pamz"), st.integers(0, 63), st.integers(1, 16),
                          st.integers(0, 63)), max_size=30))
def test_against_a_page_dict(ops):
    """Any sequence of pop/add/move/pop by source agrees with a dict page ->
    source."""
    m = RangeMap([(0, 64 * P)])
    ref = {i * P: i * P for i in range(64)}
    for op, a, n, b in ops:
        s, e = a * P, (a + n) * P
        if op == "p":
            got = {x: src + x - s0 for s0, e0, src in m.pop(s, e) for x in range(s0, e0, P)}
            want = {x: ref.pop(x) for x in range(s, e, P) if x in ref}
            assert got == want
        elif op == "z":               # two source ranges: [s, e) and [e+b, e+b+n)
            ranges = [(s, e), (e + b * P, e + (b + n) * P)]
            got = {x: src + x - s0 for s0, e0, src in m.pop_src_ranges(ranges)
                   for x in range(s0, e0, P)}
            want = {x: v for x, v in ref.items() if any(a0 <= v < b0 for a0, b0 in ranges)}
            for x in want:
                del ref[x]
            assert got == want
        elif op == "a":
            m.add(s, e, b * P)
            for i, x in enumerate(range(s, e, P)):
                ref[x] = b * P + i * P
        else:
            m.move(s, b * P, n * P)
            moved = {x - s + b * P: ref.pop(x) for x in range(s, e, P) if x in ref}
            for x in range(b * P, b * P + n * P, P):
                ref.pop(x, None)
            ref.update(moved)
        flat = {x: src + x - s0 for s0, e0, src in m.items() for x in range(s0, e0, P)}
        assert flat == ref
        starts = [s0 for s0, _, _ in m.items()]
        assert starts == sorted(starts)


def _msg(event, a=0, b=0, c=0):
    return struct.pack("<BBHI3Q", event, 0, 0, 0, a, b, c)


def test_uffd_msgs_decode():
    raw = (_msg(U.UFFD_EVENT_PAGEFAULT, 1, 0x7000_1234, 42) + _msg(U.UFFD_EVENT_FORK, 9)
           + _msg(U.UFFD_EVENT_REMAP, 0x1000, 0x9000, 0x2000)
           + _msg(U.UFFD_EVENT_REMOVE, 0x1000, 0x3000) + _msg(U.UFFD_EVENT_UNMAP, 0x5000, 0x6000))
    got = [U._decode(raw, off) for off in range(0, len(raw), U.MSG_SIZE)]
    assert got[0] == U.UffdMsg(U.UFFD_EVENT_PAGEFAULT, address=0x7000_1234, flags=1, ptid=42)
    assert got[1].ufd == 9
    assert (got[2].start, got[2].end, got[2].length) == (0x1000, 0x9000, 0x2000)
    assert (got[3].start, got[3].end) == (0x1000, 0x3000)
    assert got[4].event == U.UFFD_EVENT_UNMAP and got[4].end == 0x6000


def test_plan_keeps_stack_pointer_and_rseq_pages_eager():
    from types import SimpleNamespace as NS

    from migrate.dest.lazy import LazyPlan
    from migrate.images._pb import mm_pb2
    anon = NS(start=0x10000, end=0x20000, kind=mm_pb2.ANON_PRIVATE, flags=0x22, prot=3)
    shared = NS(start=0x30000, end=0x40000, kind=mm_pb2.ANON_SHARED, flags=0x21, prot=3)
    ro = NS(start=0x40000, end=0x41000, kind=mm_pb2.ANON_PRIVATE, flags=0x22, prot=1)
    t = NS(regs=NS(rsp=0x15008), rseq=NS(rseq_abi_pointer=0x1a010, rseq_abi_size=32))
    lp = LazyPlan([anon, shared, ro], [t], [(0x10000, 0x41000)])
    assert lp.vmas == [(0x10000, 0x20000)]
    assert lp.eager == [(0x14000, 0x16000), (0x1a000, 0x1b000)]   # red zone crosses a page
    assert lp.lazy == [(0x10000, 0x14000), (0x16000, 0x1a000), (0x1b000, 0x20000)]
    # the restore writes all but the lazy pages: here the eager ones and the rest
    parts = lp.eager_parts([(0, 0x10000, 0x31)])
    assert parts == [(4, 0x14000, 2), (10, 0x1a000, 1), (16, 0x20000, 0x21)]
