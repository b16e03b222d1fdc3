"""/proc parsers on canned contents (no I/O)."""

import struct

import pytest

from migrate.kernel import proc

SMAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:00 26723   /usr/bin/python3.11
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
AnonHugePages:         0 kB
VmFlags: rd mr mw me
7f0000000000-7f0000200000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                2048 kB
Anonymous:          2048 kB
AnonHugePages:      2048 kB
Shared_Clean:          8 kB
Shared_Dirty:       1024 kB
VmFlags: rd wr mr mw me ac hg
7f0000400000-7f0000401000 rw-s 00000000 00:01 1234    /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0       [stack]
VmFlags: rd wr mr mw me gd ac
"""


def test_parse_smaps():
    v = proc.parse_smaps(SMAPS)
    assert [x.start for x in v] == [0x55d0c0a00000, 0x7f0000000000, 0x7f0000400000,
                                    0x7ffd00000000]
    assert v[0].path == "/usr/bin/python3.11" and v[0].is_file and not v[0].writable
    assert v[1].vmflags[-1] == "hg" and v[1].anon_huge_kb == 2048 and v[1].path == ""
    assert v[1].shared_dirty_kb == 1024 and v[0].shared_dirty_kb == 0
    assert v[2].deleted and v[2].path == "/dev/zero" and v[2].shared
    assert v[3].path == "[stack]" and "gd" in v[3].vmflags and not v[3].is_file


def test_parse_maps_path_with_spaces():
    v = proc.parse_maps_line("7f00-7f01 r-xp 00001000 08:01 99  /tmp/a b/lib x.so\n")
    assert v.path == "/tmp/a b/lib x.so" and v.pgoff == 0x1000 and v.dev == (8, 1)


def test_parse_smaps_rejects_field_before_vma():
    with pytest.raises(ValueError):
        proc.parse_smaps("Rss: 4 kB\n")


def test_parse_stat_comm_with_parens_and_spaces():
    fields = ["S"] + [str(i) for i in range(4, 53)]
    text = "1234 (a) (b c) " + " ".join(fields) + "\n"
    st = proc.parse_stat(text)
    assert st.pid == 1234 and st.comm == "a) (b c" and st.state == "S"
    assert st.ppid == 4 and st.pgrp == 5 and st.session == 6
    assert st.start_code == 26 and st.end_code == 27 and st.start_stack == 28
    assert (st.start_data, st.end_data, st.start_brk) == (45, 46, 47)
    assert (st.arg_start, st.arg_end, st.env_start, st.env_end) == (48, 49, 50, 51)


def test_parse_status_and_fdinfo():
    s = proc.parse_status("Name:\tcat\nUmask:\t0022\nTracerPid:\t0\nUid:\t0\t0\t0\t0\n")
    assert s["Umask"] == "0022" and s["Uid"].split() == ["0", "0", "0", "0"]
    f = proc.parse_fdinfo("pos:\t4096\nflags:\t02100002\nmnt_id:\t24\nino:\t7\n")
    assert int(f["pos"]) == 4096 and int(f["flags"], 8) == 0o2100002


def test_parse_auxv_stops_at_null():
    data = struct.pack("<6Q", 33, 0x7fff0000, 6, 4096, 0, 0) + b"\xff" * 16
    assert proc.parse_auxv(data) == [(33, 0x7fff0000), (6, 4096), (0, 0)]
    with pytest.raises(ValueError):
        proc.parse_auxv(b"\0" * 15)


LIMITS = """\
Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max file size             unlimited            unlimited            bytes
Max data size             unlimited            unlimited            bytes
Max stack size            8388608              unlimited            bytes
Max core file size        0                    unlimited            bytes
Max resident set          unlimited            unlimited            bytes
Max processes             95603                95603                processes
Max open files            1024                 524288               files
Max locked memory         8388608              8388608              bytes
Max address space         unlimited            unlimited            bytes
Max file locks            unlimited            unlimited            locks
Max pending signals       95603                95603                signals
Max msgqueue size         819200               819200               bytes
Max nice priority         0                    0
Max realtime priority     0                    0
Max realtime timeout      unlimited            unlimited            us
"""


def test_parse_limits():
    lim = proc.parse_limits(LIMITS)
    assert len(lim) == 16
    assert lim[3] == (8388608, proc.RLIM_INFINITY)      # RLIMIT_STACK
    assert lim[7] == (1024, 524288)                     # RLIMIT_NOFILE
    assert lim[13] == (0, 0)                            # RLIMIT_NICE, no unit
    with pytest.raises(ValueError):
        proc.parse_limits(LIMITS.replace("Max open files", "Max open filez"))


def test_pagemap_regions_merged():
    """Regions reported twice across PAGEMAP_SCAN calls come out once, sorted."""
    from migrate.kernel.memory import PageRegion, _merge
    P = 4096
    got = _merge([PageRegion(0, P, 8), PageRegion(3 * P, 4 * P, 8), PageRegion(9 * P, 10 * P, 8),
                  PageRegion(3 * P, 4 * P, 8), PageRegion(9 * P, 10 * P, 8),
                  PageRegion(12 * P, 13 * P, 8)])
    assert [(r.start // P, r.end // P) for r in got] == [(0, 1), (3, 4), (9, 10), (12, 13)]


def test_pagemap_regions_overlapping_reports_keep_page_precision():
    """A page written in the first report and clean in the re-report stays
    written; its clean neighbours stay clean."""
    from migrate.kernel.memory import PageRegion, _merge
    P, W, C = 4096, 0x2 | 0x8, 0x8
    got = _merge([PageRegion(0, 5 * P, C), PageRegion(5 * P, 6 * P, W), PageRegion(6 * P, 9 * P, C),
                  PageRegion(3 * P, 9 * P, C)])        # re-report from walk_end = 3
    assert [(r.start // P, r.end // P, r.categories) for r in got] == \
        [(0, 5, C), (5, 6, W), (6, 9, C)]


def test_same_frames_on_canned_pagemaps():
    """Same PFN, present in both: shared, whatever the soft-dirty, exclusive
    and uffd-wp bits say; absent pages (0 in both), swap entries and other
    PFNs are not."""
    from migrate.kernel.memory import same_frames
    P, PRESENT, SWAP, EXCL, WP, SD = 4096, 1 << 63, 1 << 62, 1 << 56, 1 << 57, 1 << 55
    a = [PRESENT | 10, PRESENT | 11 | SD, PRESENT | 12, 0, SWAP | 5, PRESENT | 15,
         PRESENT | 16 | EXCL, PRESENT | 17]
    b = [PRESENT | 10, PRESENT | 11 | WP, PRESENT | 99, 0, SWAP | 5, PRESENT | 15 | EXCL,
         PRESENT | 16, PRESENT | 17]
    raw = lambda xs: struct.pack(f"<{len(xs)}Q", *xs)  # noqa: E731
    base = 0x7f0000000000
    got = same_frames(raw(a), raw(b), base)
    assert [((s - base) // P, (e - base) // P) for s, e in got] == [(0, 2), (5, 8)]
    assert same_frames(raw(a[:2]), raw(a[:2]), base) == [(base, base + 2 * P)]
    assert same_frames(raw([0, 0]), raw([0, 0]), base) == []
    assert same_frames(b"", b"", base) == []


TIMERS = """\
ID: 101
signal: 12/1234567890abcdef
notify: signal/pid.20310
ClockID: 1
ID: 2
signal: 36/0000000000000000
notify: signal/tid.20311
ClockID: -6
ID: 1
signal: 10/00000000000000ff
notify: none/pid.20310
ClockID: 0
"""


def test_parse_timers():
    t = proc.parse_timers(TIMERS)
    assert [x.id for x in t] == [1, 2, 101]
    assert t[0] == proc.PosixTimer(1, 10, 0xff, "none", False, 20310, 0)
    assert t[1].notify == "signal" and t[1].to_thread and t[1].notify_pid == 20311
    assert t[1].clockid == -6 and not t[2].to_thread
    assert t[2].sival == 0x1234567890abcdef and t[2].signo == 12 and t[2].clockid == 1
    assert proc.parse_timers("") == []


@pytest.mark.parametrize("bad", ["ID: 1\nsignal: x/0\nnotify: signal/pid.1\nClockID: 0\n",
                                 "ID: 1\nsignal: 10/0\nnotify: signal/pid.1\n",
                                 "ID: 1\nsignal: 10/0\nnotify: bogus/pid.1\nClockID: 0\n"])
def test_parse_timers_garbage(bad):
    with pytest.raises(ValueError):
        proc.parse_timers(bad)
