"""resources/taskctl.CallBatch on a fake task: room in the scratch area,
order of the calls and callbacks, errors, a full arena."""

from __future__ import annotations

import struct

import pytest

from migrate import errors
from migrate.kernel import sysno
from migrate.resources import task, taskctl

SCRATCH = 0x10000


class FakeMemory:
    def __init__(self) -> None:
        self.mem = bytearray(64 * 1024)
        self.writes = 0

    def write_bytes(self, pid: int, addr: int, data: bytes) -> None:
        self.writes += 1
        self.mem[addr - SCRATCH:addr - SCRATCH + len(data)] = data

    def read_bytes(self, pid: int, addr: int, size: int) -> bytes:
        return bytes(self.mem[addr - SCRATCH:addr - SCRATCH + size])


class FakeCtl:
    """What CallBatch uses of a TaskCtl; ``kernel(nr, args, mem)`` runs a call."""

    def __init__(self, mem: FakeMemory, kernel, size: int = 16384) -> None:
        self.pid = 4242
        self.scratch = SCRATCH
        self.scratch_size = size
        self.mem = mem
        self.kernel = kernel
        self.batches: list[list] = []
        self.single: list = []

    def batch(self, calls):
        self.batches.append(list(calls))
        return [self.kernel(nr, args, self.mem) for nr, args in calls]

    def call(self, nr, *args, check=True, what=""):
        self.single.append((nr, args))
        return self.kernel(nr, args, self.mem)

    def put(self, data: bytes, offset: int = 0) -> int:
        self.mem.write_bytes(self.pid, SCRATCH + offset, data)
        return SCRATCH + offset


@pytest.fixture
def mem(monkeypatch):
    m = FakeMemory()
    monkeypatch.setattr(taskctl, "memory", m)
    return m


def test_room_order_and_results(mem):
    def kernel(nr, args, m):
        if nr == sysno.getitimer:           # fills its output with its argument
            m.write_bytes(0, args[1], struct.pack("<q", args[0] * 10))
        return nr
    ctl = FakeCtl(mem, kernel)
    q = taskctl.CallBatch(ctl)
    got = []
    a = q.out(8)
    q.add(sysno.getitimer, 3, a, then=lambda r: got.append(("a", r, q.read(a, 8))))
    b = q.put(b"abc")
    q.add(sysno.brk, b, then=lambda r: got.append(("b", r)))
    assert a == SCRATCH + taskctl.ARENA_AT and b == a + 8 and b % 8 == 0
    q.run()
    assert ctl.batches == [[(sysno.getitimer, (3, a)), (sysno.brk, (b,))]]
    assert got == [("a", sysno.getitimer, struct.pack("<q", 30)), ("b", sysno.brk)]
    assert mem.read_bytes(0, b, 3) == b"abc"        # written before the calls ran
    q.run()                                          # nothing queued: nothing run
    assert len(ctl.batches) == 1


def test_a_failed_call_raises_after_the_run(mem):
    ctl = FakeCtl(mem, lambda nr, args, m: -1 if nr == sysno.setgroups else 0)
    q = taskctl.CallBatch(ctl)
    seen = []
    q.add(sysno.setgroups, 0, 0, then=seen.append)
    q.add(sysno.brk, 0, then=seen.append)
    with pytest.raises(errors.AccessDenied) as e:
        q.run()
    assert e.value.pid == 4242 and "setgroups" in str(e.value)
    assert seen == []                  # no callback once a call failed
    q.add(sysno.prctl, 66, check=False, then=seen.append)
    q.run()
    assert seen == [0]


def test_a_full_arena_runs_what_it_holds_first(mem):
    ctl = FakeCtl(mem, lambda nr, args, m: 0)
    q = taskctl.CallBatch(ctl)
    room = ctl.scratch_size - taskctl.PAGE - taskctl.ARENA_AT
    first = q.out(room - 8)
    q.add(sysno.brk, first)
    second = q.out(64)                 # does not fit: the first call runs now
    assert len(ctl.batches) == 1 and second == SCRATCH + taskctl.ARENA_AT
    with pytest.raises(ValueError):
        q.out(room + 8)


def test_many_groups_are_set_on_their_own(mem):
    ctl = FakeCtl(mem, lambda nr, args, m: 0)
    q = taskctl.CallBatch(ctl)
    full = 0x1FFFFFFFFFF
    now = {"CapPrm": f"{full:x}", "CapBnd": f"{full:x}", "CapInh": "0"}
    c = type("Creds", (), dict(uid=[0, 0, 0, 0], gid=[0, 0, 0, 0], groups=list(range(2000)),
                               cap_eff=full, cap_prm=full, cap_inh=0, cap_bnd=full,
                               cap_amb=0, securebits=0, no_new_privs=1))
    task.restore_creds(q, c, now)
    q.run()
    assert ctl.single == [(sysno.setgroups, (2000, SCRATCH))]
    assert mem.read_bytes(0, SCRATCH, 8) == struct.pack("<2I", 0, 1)
    assert [nr for b in ctl.batches for nr, _ in b] == [sysno.prctl]    # NO_NEW_PRIVS
    c.groups = [5, 6]
    ctl.batches.clear()
    task.restore_creds(q, c, now)
    q.run()
    assert [nr for nr, _ in ctl.batches[0]] == [sysno.setgroups, sysno.prctl]
