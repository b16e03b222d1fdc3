#!/usr/bin/env python3
"""`make demo`: start a counting program, dump it, kill it, restore it, and
show that it counts on from where it was, at the same PID."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from migrate.kernel import syscalls  # noqa: E402


def migrate(*args: str) -> None:
    cmd = [sys.executable, "-m", "migrate", *args]
    print("$ migrate " + " ".join(args), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def counts(path: str) -> list[int]:
    with open(path) as f:
        return [int(m) for m in re.findall(r"count (\d+)", f.read())]


def main() -> int:
    syscalls.set_child_subreaper()   # the restored process becomes our child
    work = tempfile.mkdtemp(prefix="migrate-demo-")
    log_path = os.path.join(work, "counter.log")
    images = os.path.join(work, "images")
    with open(log_path, "ab") as log:
        p = subprocess.Popen([os.path.join(ROOT, "tests/programs/bin/counter")],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             start_new_session=True)
    pid = p.pid
    try:
        time.sleep(1.0)
        before = counts(log_path)
        print(f"counter (pid {pid}) is counting: ... {before[-3:]}")
        migrate("dump", "-t", str(pid), "-D", images, "--display-stats")
        p.wait()
        print(f"dumped and killed: pid {pid} is gone "
              f"(exists: {os.path.exists(f'/proc/{pid}')})")
        last = counts(log_path)[-1]
        time.sleep(0.5)
        migrate("restore", "-D", images, "-d", "--display-stats")
        time.sleep(1.0)
        after = counts(log_path)
        new = after[after.index(last) + 1:]
        print(f"restored at pid {pid}: last count before the dump {last}, "
              f"it goes on with {new[:5]} ...")
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        verdict = open(log_path).read().strip().splitlines()[-1]
        print(f"SIGTERM: the counter checked its own sequence and says {verdict!r}")
        ok = os.waitstatus_to_exitcode(status) == 0 and new and new[0] == last + 1
        print("demo:", "OK" if ok else "FAILED", f"(images and log in {work})")
        return 0 if ok else 1
    finally:
        for target in (pid,):
            try:
                os.kill(target, signal.SIGKILL)
                os.waitpid(target, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


if __name__ == "__main__":
    sys.exit(main())
