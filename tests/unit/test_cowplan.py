"""The restore's COW premap plan (resources/memory.CowPlan) on canned VMAs."""

from migrate.images._pb import mm_pb2
from migrate.resources import memory
from migrate.resources.memory import CowPlan, CowProc

P = 4096
A = 0x7f0000000000               # a huge-page aligned VMA of 16 pages
ANON = memory.MAP_PRIVATE | memory.MAP_ANONYMOUS


def plan_of(procs, taken=()):
    return CowPlan(procs, taken, min_pages=1)


def vma(start, pages, kind=mm_pb2.ANON_PRIVATE, flags=ANON, vmflags=("ac",)):
    return mm_pb2.vma_entry(start=start, end=start + pages * P, kind=kind, flags=flags,
                            vmflags=list(vmflags))


def pages(*ranges):
    """Page numbers of A as normalized byte ranges."""
    return [(A + s * P, A + e * P) for s, e in ranges]


def proc(pid, ppid, shared=(), vmas=None, stored=((0, 16),)):
    return CowProc(pid, ppid, vmas or [vma(A, 16)], pages(*stored), pages(*shared))


def test_three_generations():
    """R -> C -> G and R -> D: each takes the part of its parent's area it
    shares, drops the pages it inherits but does not share, and C reads in
    what G shares with it beyond what C shares with R."""
    plan = plan_of([proc(1, 0), proc(2, 1, [(0, 4), (8, 10)]), proc(3, 1, [(0, 2), (12, 13)]),
                    proc(4, 2, [(0, 2), (4, 6)])])
    r, = plan.areas[1]
    assert not r.inherited and r.fill == r.valid == pages((0, 4), (8, 10), (12, 13))
    assert r.addr % (2 << 20) == 0 and r.addr >= memory.PREMAP_FROM
    c, = plan.areas[2]
    assert c.inherited and c.addr == r.addr
    assert c.clear == pages((12, 13)) and c.fill == pages((4, 6))
    assert c.valid == pages((0, 6), (8, 10))
    d, = plan.areas[3]
    assert d.valid == pages((0, 2), (12, 13)) and d.clear == pages((2, 4), (8, 10))
    g, = plan.areas[4]
    assert g.addr == r.addr and g.valid == pages((0, 2), (4, 6))
    assert g.clear == pages((2, 4), (8, 10))
    assert [plan.pages_shared(p) for p in (1, 2, 3, 4)] == [0, 6, 3, 4]
    assert plan.pages_filled(1) == 7 and plan.pages_filled(2) == 2
    assert plan.drop == {}
    assert plan.kept(2) == [(r.addr, r.addr + 16 * P)]
    assert plan.moves(4) == {A: g}


def test_child_vma_inside_the_parents():
    """The child's VMA is a part of the parent's (it unmapped the rest): it
    takes that part of the area; the rest is unmapped before it forks."""
    child = [vma(A + 4 * P, 4)]
    plan = plan_of([proc(1, 0), proc(2, 1, [(4, 8)], child, stored=((4, 8),))])
    r, = plan.areas[1]
    c, = plan.areas[2]
    assert c.addr == r.addr + 4 * P and c.valid == pages((4, 8)) and c.clear == []
    assert plan.drop[2] == [(r.addr, r.addr + 4 * P), (r.addr + 8 * P, r.addr + 16 * P)]


def test_what_cannot_be_shared():
    """A VMA that is not inside one VMA of the parent, a stack (MAP_GROWSDOWN),
    MAP_NORESERVE on one side only, pages the parent's image does not hold:
    nothing is planned, each process gets its own copy."""
    two = [vma(A, 8), vma(A + 8 * P, 8, vmflags=("ac", "nh"))]
    assert plan_of([proc(1, 0, vmas=two), proc(2, 1, [(6, 10)])]).areas == {}
    stack = [vma(A, 16, kind=mm_pb2.STACK, flags=ANON | memory.MAP_GROWSDOWN)]
    assert plan_of([proc(1, 0, vmas=stack), proc(2, 1, [(0, 4)], stack)]).areas \
        == {}
    noreserve = [vma(A, 16, flags=ANON | memory.MAP_NORESERVE, vmflags=())]
    assert plan_of([proc(1, 0), proc(2, 1, [(0, 4)], noreserve)]).areas == {}
    assert plan_of([proc(1, 0, stored=((8, 16),)), proc(2, 1, [(0, 4)])]).areas \
        == {}


def test_too_few_pages_shared():
    """Below COW_MIN_PAGES a child gets its own copy (not worth a premap)."""
    few = CowPlan([proc(1, 0), proc(2, 1, [(0, 4)])])
    assert few.areas == {} and few.pages_shared(2) == 0


def test_nothing_shared_and_lazy():
    assert plan_of([proc(1, 0), proc(2, 1)]).areas == {}
    assert plan_of([]).valid(1) == [] and plan_of([]).kept(1) == []


def test_areas_avoid_every_vma_and_taken_ranges():
    busy = [(memory.PREMAP_FROM, memory.PREMAP_FROM + P)]
    far = vma(memory.PREMAP_FROM + memory.PREMAP_STEP + 8 * P, 1)
    plan = plan_of([proc(1, 0, vmas=[vma(A, 16), far]), proc(2, 1, [(0, 4)])], busy)
    r, = plan.areas[1]
    assert r.addr == memory.PREMAP_FROM + 2 * memory.PREMAP_STEP


def test_thp_offset_and_advice_kept():
    """An area keeps its VMA's offset in a huge page, and its THP advice."""
    off = A + 5 * P
    v = [vma(off, 16, vmflags=("ac", "nh"))]
    plan = plan_of([proc(1, 0, vmas=v, stored=((5, 21),)),
                    proc(2, 1, [(5, 9)], v, stored=((5, 21),))])
    r, = plan.areas[1]
    assert r.addr % (2 << 20) == 5 * P and r.advice == [memory.MADV_FOR_FLAG["nh"]]
