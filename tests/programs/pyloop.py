#!/usr/bin/env python3
"""pyloop: a real interpreter as the workload (nobody here wrote CPython).

Computes a deterministic 3000-step hash chain, one step every ~5 ms, keeping
the values in a dict and a list and appending "step value" lines to a file
opened before READY and kept open (/tmp/pyloop.XXXXXXXX/steps.txt, removed
at the end).  SIGTERM only sets a flag: the chain is always finished, then
the file and the in-memory state are verified against a fresh recomputation.
Takes about 16 s of wall time (plus time spent frozen).  No threads, pipes,
sockets or subprocesses: the dumper only handles regular files and char
devices.
"""
import os
import shutil
import signal
import sys
import tempfile
import time

STEPS = 3000
SEED = 0x0123456789ABCDEF
MASK = (1 << 64) - 1

stop = False
tmpdir = None


def on_term(signum, frame):
    global stop
    stop = True


def step(h, i):
    h ^= (h << 13) & MASK
    h ^= h >> 7
    h ^= (h << 17) & MASK
    return (h + i * 0x9E3779B97F4A7C15) & MASK


def cleanup():
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


def fail(msg):
    os.write(1, f"FAIL: {msg}\n".encode())
    cleanup()
    sys.exit(1)


def main():
    global tmpdir
    signal.signal(signal.SIGTERM, on_term)
    tmpdir = tempfile.mkdtemp(prefix="pyloop.")  # just a path; no fd kept
    path = os.path.join(tmpdir, "steps.txt")
    out = open(path, "w")  # kept open across dumps; flushed every 100 steps

    state = {}
    values = []
    h = SEED
    os.write(1, b"READY\n")
    for i in range(STEPS):  # finished even if SIGTERM comes early
        h = step(h, i)
        state[i] = h
        values.append(h)
        out.write(f"{i} {h:016x}\n")
        if i % 100 == 99:
            out.flush()
        time.sleep(0.005)
    while not stop:
        time.sleep(0.05)

    out.flush()
    size = os.fstat(out.fileno()).st_size
    if out.tell() != size:
        fail(f"steps file offset {out.tell()} != size {size}")
    out.close()
    with open(path) as f:
        lines = f.read().split("\n")
    if lines[-1] != "" or len(lines) - 1 != STEPS:
        fail(f"steps file has {len(lines) - 1} lines, expected {STEPS}")
    if len(state) != STEPS or len(values) != STEPS:
        fail(f"in-memory state has {len(state)}/{len(values)} entries, expected {STEPS}")
    r = SEED
    for i in range(STEPS):
        r = step(r, i)
        if lines[i] != f"{i} {r:016x}":
            fail(f"file line {i + 1} is {lines[i]!r}, expected '{i} {r:016x}'")
        if state[i] != r or values[i] != r:
            fail(f"step {i}: dict {state[i]:#x} list {values[i]:#x}, expected {r:#x}")
    if h != r:
        fail(f"final hash {h:#x}, recomputed {r:#x}")
    cleanup()
    os.write(1, b"PASS\n")


if __name__ == "__main__":
    main()
