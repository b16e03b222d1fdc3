"""The kernel's event objects: eventfd, signalfd, timerfd, epoll.

Dump reads each from /proc/PID/fdinfo (fs/*.c show_fdinfo): the eventfd
counter and semaphore mode, the signalfd mask, the timerfd clock, pending
expirations, time to the next one and interval, and every fd an epoll
watches with its events and user data.  Restore (inside the new task, like
regular files) creates them again; epoll watches are added last, once every
fd is at its number.  A timer is re-armed at an absolute time of its clock
that takes off the time spent dumped ("time goes on", resources/timers.py);
one set with TFD_TIMER_ABSTIME thus keeps its absolute expiry on the
realtime clock, and TFD_TIMER_CANCEL_ON_SET is kept.
"""

from __future__ import annotations

import logging
import os
import re

from migrate import errors
from migrate.images._pb import files_pb2
from migrate.kernel import syscalls
from migrate.resources import timers

log = logging.getLogger(__name__)

KINDS = {"anon_inode:[eventfd]": files_pb2.EVENTFD, "anon_inode:[signalfd]": files_pb2.SIGNALFD,
         "anon_inode:[timerfd]": files_pb2.TIMERFD, "anon_inode:[eventpoll]": files_pb2.EPOLL}
O_NONBLOCK, O_CLOEXEC = os.O_NONBLOCK, 0o2000000
_PAIR = re.compile(r"\((-?\d+),\s*(-?\d+)\)")
_TFD = re.compile(r"tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)")


def dump(pid: int, fd: int, fid: int, link: str, flags: int, info: dict[str, str],
         raw: str):
    kind = KINDS[link]
    fl = flags & O_NONBLOCK
    f = files_pb2.file_entry(id=fid, type=kind)
    try:
        if kind == files_pb2.EVENTFD:
            f.eventfd.CopyFrom(files_pb2.eventfd_entry(
                count=int(info["eventfd-count"], 16),
                semaphore=info.get("eventfd-semaphore", "0") == "1", flags=fl))
        elif kind == files_pb2.SIGNALFD:
            f.signalfd.CopyFrom(files_pb2.signalfd_entry(sigmask=int(info["sigmask"], 16),
                                                         flags=fl))
        elif kind == files_pb2.TIMERFD:
            v = _PAIR.search(info["it_value"])
            i = _PAIR.search(info["it_interval"])
            f.timerfd.CopyFrom(files_pb2.timerfd_entry(
                clockid=int(info["clockid"]), ticks=int(info["ticks"]),
                settime_flags=int(info["settime flags"], 8),
                value_sec=int(v.group(1)), value_nsec=int(v.group(2)),
                interval_sec=int(i.group(1)), interval_nsec=int(i.group(2)), flags=fl,
                dump_realtime_ns=timers.now_realtime_ns()))
        else:
            e = files_pb2.epoll_entry(flags=fl)
            for m in _TFD.finditer(raw):
                e.tfds.add(tfd=int(m.group(1)), events=int(m.group(2), 16),
                           data=int(m.group(3), 16))
            f.epoll.CopyFrom(e)
    except (KeyError, AttributeError, ValueError) as e:
        raise errors.UnsupportedResource(pid, link, f"fdinfo not understood ({e})",
                                         fd=fd) from None
    return f


TFD_TIMER_ABSTIME = 1


def open_object(f) -> int:
    """Create one event object (runs in the new task); epoll watches later."""
    if f.type == files_pb2.EVENTFD:
        e = f.eventfd
        flags = (os.EFD_SEMAPHORE if e.semaphore else 0) | os.EFD_CLOEXEC
        fd = os.eventfd(min(e.count, 0xFFFFFFFF), flags)
        if e.count > 0xFFFFFFFF:          # eventfd(2) takes an unsigned int
            os.eventfd_write(fd, e.count - 0xFFFFFFFF)
    elif f.type == files_pb2.SIGNALFD:
        fd = syscalls.signalfd(f.signalfd.sigmask, O_CLOEXEC)
    elif f.type == files_pb2.TIMERFD:
        t = f.timerfd
        fd = syscalls.timerfd_create(t.clockid, O_CLOEXEC)
        value = (t.value_sec, t.value_nsec)
        interval = (t.interval_sec, t.interval_nsec)
        if value == (0, 0) and interval != (0, 0):
            value = interval     # expired and not re-armed until read: next period
        if value != (0, 0):
            # Time goes on (resources/timers.py): absolute in the timer's clock,
            # less the time spent dumped; missed periods become ticks.
            ns = value[0] * timers.NSEC + value[1]
            _, at = timers.rearm(t.clockid, ns, timers.elapsed_ns(t.dump_realtime_ns))
            syscalls.timerfd_settime(fd, t.settime_flags | TFD_TIMER_ABSTIME,
                                     divmod(at, timers.NSEC), interval)
        if t.ticks:
            syscalls.timerfd_set_ticks(fd, t.ticks)
    else:
        import select
        ep = select.epoll(flags=select.EPOLL_CLOEXEC)
        fd = os.dup(ep.fileno())
        ep.close()
    flags = (f.eventfd.flags or f.signalfd.flags or f.timerfd.flags or f.epoll.flags)
    if flags & O_NONBLOCK:
        os.set_blocking(fd, False)
    return fd


def add_watches(files, fdinfos) -> None:
    """epoll_ctl(ADD) every watch, the fds at their numbers by now."""
    by_id = {f.id: f for f in files}
    for fi in fdinfos:
        f = by_id[fi.id]
        if f.type != files_pb2.EPOLL:
            continue
        for w in f.epoll.tfds:
            try:
                syscalls.epoll_add(fi.fd, w.tfd, w.events, w.data)
            except errors.KernelError as e:
                if e.errno != 17:      # EEXIST: a second fd of the same epoll
                    raise
        by_id[fi.id] = files_pb2.file_entry(id=f.id, type=files_pb2.EPOLL)  # once per epoll
