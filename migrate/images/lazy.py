"""Which pages of an image may be lazy (post-copy): pure arithmetic on the
image's messages, shared by the dump (which leaves them out of the page
file, flagged PE_LAZY) and the restore (which leaves them to the daemon).

Lazy: pages of private anonymous VMAs (anonymous, heap, stack) that are
readable and writable.  Never lazy: the page holding each thread's stack
pointer and the 128-byte red zone below it, and each thread's rseq area
(the kernel writes it whenever the thread returns to user space, the
restore's own remote syscalls included).
"""

from __future__ import annotations

from migrate.images import pagemap
from migrate.images._pb import mm_pb2

PAGE = pagemap.PAGE
LAZY_KINDS = (mm_pb2.ANON_PRIVATE, mm_pb2.HEAP, mm_pb2.STACK)
RED_ZONE = 128               # x86-64 ABI: below rsp, a leaf function's scratch
MAP_SHARED = 0x01
PROT_RW = 0x3


def lazy_vmas(vmas) -> list[pagemap.Range]:
    """The VMAs whose pages may be lazy (vma_entry messages)."""
    return pagemap.normalize((e.start, e.end) for e in vmas
                             if e.kind in LAZY_KINDS and not e.flags & MAP_SHARED
                             and e.prot & PROT_RW == PROT_RW)


def eager_ranges(threads) -> list[pagemap.Range]:
    """Pages that are never lazy (thread_core_entry messages)."""
    eager = []
    for t in threads:
        sp = t.regs.rsp
        eager.append(((sp - RED_ZONE) & ~(PAGE - 1), (sp & ~(PAGE - 1)) + PAGE))
        r = t.rseq
        if r.rseq_abi_pointer:
            a = r.rseq_abi_pointer
            eager.append((a & ~(PAGE - 1),
                          (a + max(r.rseq_abi_size, 32) + PAGE - 1) & ~(PAGE - 1)))
    return pagemap.normalize(eager)


def lazy_ranges(data: list[pagemap.Range], vmas, threads) -> list[pagemap.Range]:
    """Of the data pages ``data`` (normalized), those that may be lazy."""
    return pagemap.subtract(pagemap.intersect(data, lazy_vmas(vmas)), eager_ranges(threads))
