"""The event objects' fdinfo, parsed from canned text (fs/*.c show_fdinfo)."""

from migrate.images._pb import files_pb2
from migrate.kernel import proc
from migrate.resources import eventobjs

EVENTFD = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\neventfd-count:               2a\n" \
          "eventfd-id: 1\neventfd-semaphore: 1\n"
TIMERFD = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\nclockid: 1\nticks: 3\n" \
          "settime flags: 01\nit_value: (1, 250)\nit_interval: (0, 100000000)\n"
EPOLL = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n" \
        "tfd:        5 events:       19 data:                7  pos:0 ino:40e sdev:10\n" \
        "tfd:        3 events: 80000019 data:     deadbeefcafe  pos:0 ino:40e sdev:10\n"


def _dump(link, text):
    return eventobjs.dump(1, 3, 9, link, int(proc.parse_fdinfo(text)["flags"], 8),
                          proc.parse_fdinfo(text), text)


def test_eventfd():
    f = _dump("anon_inode:[eventfd]", EVENTFD)
    assert f.type == files_pb2.EVENTFD and f.eventfd.count == 42 and f.eventfd.semaphore
    assert f.eventfd.flags == 0o4000


def test_timerfd():
    t = _dump("anon_inode:[timerfd]", TIMERFD).timerfd
    assert (t.clockid, t.ticks, t.settime_flags) == (1, 3, 1)
    assert (t.value_sec, t.value_nsec, t.interval_sec, t.interval_nsec) == (1, 250, 0, 100000000)


def test_epoll_watches():
    e = _dump("anon_inode:[eventpoll]", EPOLL).epoll
    assert [(w.tfd, w.events, w.data) for w in e.tfds] == [(5, 0x19, 7),
                                                           (3, 0x80000019, 0xdeadbeefcafe)]
    assert e.flags == 0


def test_bad_fdinfo_is_unsupported_not_a_crash():
    import pytest
    from migrate import errors
    with pytest.raises(errors.UnsupportedResource, match="fdinfo not understood"):
        _dump("anon_inode:[timerfd]", "pos:\t0\nflags:\t02\n")


def test_sock_diag_reply_parsed():
    """A canned NETLINK_SOCK_DIAG reply: one socket with peer, queue lengths
    and shutdown, then NLMSG_DONE."""
    import struct
    from migrate.kernel import sockdiag as sd
    attrs = b""
    for atype, val in ((sd.UNIX_DIAG_PEER, struct.pack("=I", 77)),
                       (sd.UNIX_DIAG_RQLEN, struct.pack("=II", 5, 0)),
                       (sd.UNIX_DIAG_SHUTDOWN, b"\x02")):
        a = sd.RTA.pack(sd.RTA.size + len(val), atype) + val
        attrs += a + b"\0" * (-len(a) % 4)
    body = sd.UNIX_DIAG_MSG.pack(1, 1, 1, 0, 76, 0, 0) + attrs
    msg = sd.NLMSGHDR.pack(sd.NLMSGHDR.size + len(body), sd.SOCK_DIAG_BY_FAMILY, 2, 1, 0) + body
    done = sd.NLMSGHDR.pack(sd.NLMSGHDR.size + 4, sd.NLMSG_DONE, 2, 1, 0) + b"\0" * 4
    socks, finished = sd.parse(msg + done)
    assert finished and socks == [sd.UnixSock(ino=76, type=1, state=1, peer=77, rqueue=5,
                                              wqueue=0, shutdown=2)]


def test_inotify_fdinfo_lines():
    from migrate.resources import inotify
    raw = ("pos:\t0\nflags:\t00\nmnt_id:\t17\nino:\t1038\n"
           "inotify wd:2 ino:2246a5 sdev:fe00000 mask:2 ignored_mask:0 fhandle-bytes:8 "
           "fhandle-type:1 f_handle:a5462200e1757054\n"
           "inotify wd:1f ino:3f7e8 sdev:fe00000 mask:40000100 ignored_mask:0 "
           "fhandle-bytes:8 fhandle-type:1 f_handle:e8f7030000000000\n")
    got = [m.groups() for m in inotify._WD.finditer(raw)]
    assert [(int(g[0], 16), int(g[3], 16)) for g in got] == [(2, 2), (0x1f, 0x40000100)]
    assert bytes.fromhex(got[0][7]) == bytes.fromhex("a5462200e1757054")
