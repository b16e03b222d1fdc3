"""migrate/pageserver/protocol.py on canned bytes, with hypothesis, and fuzzed."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate.pageserver import protocol as P

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
C, S = P.Role.CLIENT, P.Role.SERVER


def pair():
    return P.Connection(C), P.Connection(S)


def events_of(conn, data, splits=()):
    """Feed ``data`` cut at ``splits``, then EOF; return every event.  A server
    answers HELLO with WELCOME, as the real one does."""
    out = []

    def got(ev):
        out.append(ev)
        if isinstance(ev, P.Hello) and conn.our_role is S:
            conn.send(P.Welcome())

    cuts = [0, *sorted(set(min(max(0, s), len(data)) for s in splits)), len(data)]
    for a, b in zip(cuts, cuts[1:]):
        if a == b:
            continue
        conn.receive_data(data[a:b])
        while (ev := conn.next_event()) is not P.NEED_DATA:
            got(ev)
    conn.receive_data(b"")
    while not isinstance(ev := conn.next_event(), P.ConnectionClosed):
        got(ev)
    return out


def opened(mode=P.MODE_WRITE, caps=P.CAP_GET):
    """A client and a server past HELLO/WELCOME."""
    c, s = pair()
    s.receive_data(c.send(P.Hello("sess", mode)))
    assert isinstance(s.next_event(), P.Hello)
    c.receive_data(s.send(P.Welcome(caps=caps)))
    assert isinstance(c.next_event(), P.Welcome)
    return c, s


def chunk(pid=7, index=0, nr=1, fill=b"\xab"):
    return P.PageChunk(pid, index, nr, b"d" * 16, fill * (nr * P.PAGE_SIZE))


# ------------------------------------------------------------------ canned

def test_write_session_round_trip():
    c, s = pair()
    sent = [P.Hello("hostA/job-1"), ]
    data = c.send(sent[0])
    assert events_of(s, data)[0] == sent[0]
    c2, s2 = opened()
    evs = [P.FilePart("core-7.img", 0, b"abc"), P.FilePart("core-7.img", 3, b"de", last=True),
           P.SetParent("../pre1"), P.PagesBegin(7), chunk(index=1, nr=3), chunk(index=0),
           P.ZeroRange(7, 0x1000, 5), P.ParentRange(7, 0x7000, 2), P.Commit(b"I" * 40)]
    got = events_of(s2, b"".join(c2.send(e) for e in evs))
    assert got == evs
    assert s2.state is P.State.COMMITTING
    c2.receive_data(s2.send(P.Committed(9, 12345)))
    assert c2.next_event() == P.Committed(9, 12345)
    assert c2.state is s2.state is P.State.DONE


def test_large_file_parts_round_trip():
    """A file part over BIG_PAYLOAD (files.img with TCP queues) is received
    in place, into a memoryview: its name still decodes."""
    c, s = opened()
    big = bytes(range(256)) * ((P.BIG_PAYLOAD * 3) // 256)
    evs = [P.FilePart("files.img", 0, big), P.FilePart("files.img", len(big), b"z", last=True)]
    data = b"".join(c.send(e) for e in evs)
    got = []
    for i in range(0, len(data), 7919):          # any split of the stream
        s.receive_data(data[i:i + 7919])
        while (ev := s.next_event()) is not P.NEED_DATA:
            got.append(ev)
    assert [(e.name, e.offset, bytes(e.data), e.last) for e in got] == \
        [(e.name, e.offset, bytes(e.data), e.last) for e in evs]


def test_read_session_gets_answered_in_order():
    c, s = opened(P.MODE_READ)
    gets = [P.Get(i, 7, 0x1000 * i, 1) for i in range(3)]
    assert events_of(s, b"".join(c.send(g) for g in gets)) == gets
    for i in range(3):
        d = P.PageData(i, 0x1000 * i, 1, b"x" * 16, b"p" * 4096)
        c.receive_data(s.send(d))
        assert c.next_event() == d
    with pytest.raises(P.LocalProtocolError, match="req_id 5, outstanding: none"):
        s.send(P.PageData(5, 0, 1, b"x" * 16, b"p" * 4096))


def test_page_map_answers_get_map_in_order_over_frames():
    c, s = opened(P.MODE_READ, P.CAP_GET | P.CAP_MAP)
    s.receive_data(c.send(P.GetMap(1, 7)) + c.send(P.Get(2, 7, 0x1000, 1)))
    assert s.next_event() == P.GetMap(1, 7)
    assert isinstance(s.next_event(), P.Get)
    first = ((0x1000, 2, P.MAP_REMOTE), (0x3000, 5, P.MAP_LOCAL))
    last = ((0x10000, 1, P.MAP_ZERO),)
    c.receive_data(s.send(P.PageMap(1, 7, first, last=False)) + s.send(P.PageMap(1, 7, last)))
    ev = c.next_event()
    assert ev.runs == first and not ev.last
    ev = c.next_event()
    assert ev.runs == last and ev.last
    # the GET is answered after the map's last frame, not between its frames
    c.receive_data(s.send(P.PageData(2, 0x1000, 1, b"d" * 16, bytes(P.PAGE_SIZE))))
    assert isinstance(c.next_event(), P.PageData)


def test_get_runs_answered_by_one_page_data_of_all_its_pages():
    c, s = opened(P.MODE_READ, P.CAP_GET | P.CAP_RUNS)
    runs = ((0x1000, 2), (0x5000, 1), (0x9000, 3))
    s.receive_data(c.send(P.GetRuns(4, 7, runs)))
    ev = s.next_event()
    assert ev.runs == runs and ev.nr_pages == 6
    with pytest.raises(P.LocalProtocolError, match="asked for 6"):
        s.send(P.PageData(4, 0x1000, 2, b"d" * 16, bytes(2 * P.PAGE_SIZE)))
    c.receive_data(s.send(P.PageData(4, 0x1000, 6, b"d" * 16, bytes(6 * P.PAGE_SIZE))))
    assert c.next_event().nr_pages == 6
    for bad, why in ((((0x2000, 1), (0x1000, 1)), "after"),
                     (((0x1000, P.MAX_GET_PAGES), (0x100000000, 1)), "pages in all"),
                     ((), "0 runs")):
        with pytest.raises(P.LocalProtocolError, match=why):
            c.send(P.GetRuns(5, 7, bad))
    c2, s2 = opened(P.MODE_READ)
    with pytest.raises(P.LocalProtocolError, match="CAP_RUNS"):
        c2.send(P.GetRuns(1, 7, runs))


def test_done_ends_a_read_session_once_cap_done_is_granted():
    c, s = opened(P.MODE_READ, P.CAP_GET | P.CAP_DONE)
    s.receive_data(c.send(P.Done()))
    assert s.next_event() == P.Done()
    assert s.state is P.State.CLOSED and c.state is P.State.CLOSED
    with pytest.raises(P.LocalProtocolError, match="not allowed in state"):
        c.send(P.Get(1, 7, 0x1000, 1))
    c2, s2 = opened(P.MODE_READ)
    with pytest.raises(P.LocalProtocolError, match="CAP_DONE"):
        c2.send(P.Done())
    s2.receive_data(P.HEADER.pack(P.Done.TYPE, 0, 0, 0))
    with pytest.raises(P.RemoteProtocolError, match="CAP_DONE was not granted"):
        s2.next_event()
    c3, s3 = opened(P.MODE_WRITE, P.CAP_GET | P.CAP_DONE)   # read sessions only
    with pytest.raises(P.LocalProtocolError, match="not allowed in state"):
        c3.send(P.Done())


def test_get_map_needs_cap_map_and_a_sane_map():
    c, s = opened(P.MODE_READ)
    with pytest.raises(P.LocalProtocolError, match="CAP_MAP"):
        c.send(P.GetMap(1, 7))
    frame = P.HEADER.pack(P.GetMap.TYPE, 0, 0, 8) + struct.pack("<II", 1, 7)
    s.receive_data(frame)
    with pytest.raises(P.RemoteProtocolError, match="CAP_MAP"):
        s.next_event()
    c, s = opened(P.MODE_READ, P.CAP_GET | P.CAP_MAP)
    with pytest.raises(P.LocalProtocolError, match="outstanding"):
        s.send(P.PageMap(1, 7, ()))                     # nothing asked
    s.receive_data(c.send(P.GetMap(1, 7)))
    s.next_event()
    for runs, why in ((((0x1001, 1, P.MAP_REMOTE),), "not page aligned"),
                      (((0x2000, 1, P.MAP_REMOTE), (0x1000, 1, P.MAP_LOCAL)), "after"),
                      (((0x1000, 0, P.MAP_ZERO),), "empty"),
                      (((0x1000, 1, 9),), "kind 9")):
        with pytest.raises(P.LocalProtocolError, match=why):
            s.send(P.PageMap(1, 7, runs))
        # and from the wire: the run is refused with its offset
        body = struct.pack("<IIII", 1, 7, len(runs), 0) + b"".join(
            struct.pack("<QII", *r) for r in runs)
        c2, s2 = opened(P.MODE_READ, P.CAP_GET | P.CAP_MAP)
        s2.receive_data(c2.send(P.GetMap(1, 7)))
        s2.next_event()
        c2.receive_data(P.HEADER.pack(P.PageMap.TYPE, 1, 0, len(body)) + body)
        with pytest.raises(P.RemoteProtocolError, match=why):
            c2.next_event()


def test_out_of_order_is_refused_both_ways():
    c, s = pair()
    with pytest.raises(P.LocalProtocolError, match="not allowed in state AWAIT_HELLO"):
        c.send(P.PagesBegin(1))
    s.receive_data(P.Connection(C).send(P.Hello("x")) and
                   struct.pack("<BBHI", 5, 0, 0, 4) + b"\1\0\0\0")
    with pytest.raises(P.RemoteProtocolError, match=r"PagesBegin from the client not "
                                                    r"allowed in state AWAIT_HELLO \(at byte 0"):
        s.next_event()


@pytest.mark.parametrize("name,why", [
    ("/etc", "absolute"), ("../x", "'..' component"), ("a/../../b", "'..'"),
    ("a\0b", "NUL"), ("x" * 201, "limit is 200"), ("", "empty"), ("a b", "components"),
    ("a//b", "components"), ("./a", "'.'"),
])
def test_bad_session_names(name, why):
    c = P.Connection(C)
    with pytest.raises(P.LocalProtocolError, match=re.escape(why)):
        c.send(P.Hello(name))
    # The same bytes from a peer are refused with BAD_NAME and the offset.
    raw = name.encode()
    frame = struct.pack("<BBHI", 1, 0, 0, 12 + len(raw)) + struct.pack(
        "<4sHBBI", b"MGPS", 1, 1, 0, 0) + raw
    s = P.Connection(S)
    s.receive_data(frame)
    with pytest.raises(P.RemoteProtocolError) as ei:
        s.next_event()
    if len(raw) > P.MAX_SESSION_NAME:   # refused on the frame header's length
        assert ei.value.offset == 4 and "payload length 213" in str(ei.value)
    else:
        assert ei.value.code == P.Code.BAD_NAME
        assert ei.value.offset == 8 + 12


def test_file_names_and_link_targets():
    c, _ = opened()
    for bad in ("inventory.img", "pages-1.img", "../core-1.img", "Core-1.img", "x", "a.img\0"):
        with pytest.raises(P.LocalProtocolError, match="not an image file"):
            c.send(P.FilePart(bad, 0, b""))
    for bad in ("/abs", "a\0", "x" * 256):
        with pytest.raises(P.LocalProtocolError):
            c.send(P.SetParent(bad))
    c.send(P.FilePart("stats-dump.img", 0, b""))
    c.send(P.SetParent("../../a/b"))


def test_lying_length_refused_at_header():
    _, s = opened()
    # A chunk header claiming 2 GiB: refused with the offset of the length field
    # before a single payload byte arrived.
    base = s.offset
    s.receive_data(struct.pack("<BBHI", 6, 0, 0, 0x7FFFFFFF))
    with pytest.raises(P.RemoteProtocolError, match=rf"outside 4128\.\.8388640 \(at byte "
                                                    rf"{base + 4} "):
        s.next_event()


def test_chunk_count_must_match_data():
    _, s = opened()
    body = struct.pack("<IIII16s", 7, 0, 2048, 0, b"d" * 16) + b"\0" * 4096
    s.receive_data(struct.pack("<BBHI", 6, 0, 0, len(body)) + body)
    with pytest.raises(P.RemoteProtocolError, match="nr_pages 2048 but 4096 bytes"):
        s.next_event()


def test_huge_counts():
    c, s = opened()
    for ev, why in [(P.PageChunk(7, 0, 4096, b"d" * 16, b""), "nr_pages 4096"),
                    (P.PageChunk(7, 1 << 20, 1, b"d" * 16, b"\0" * 4096), "chunk index"),
                    (P.FilePart("mm-1.img", P.MAX_FILE_SIZE, b"x"), "MAX_FILE_SIZE")]:
        with pytest.raises(P.LocalProtocolError, match=why):
            c.send(ev)
    c2, s2 = opened(P.MODE_READ)
    for i in range(P.MAX_OUTSTANDING_GETS):
        s2.receive_data(c2.send(P.Get(i, 1, 0, 1)))
        s2.next_event()
    s2.receive_data(struct.pack("<BBHI", 12, 0, 0, 24) + struct.pack("<IIQII", 99, 1, 0, 1, 0))
    with pytest.raises(P.RemoteProtocolError, match="more than 64 GETs"):
        s2.next_event()


def test_truncated_stream():
    c, s = opened()
    data = c.send(chunk())
    s.receive_data(data[:100])
    assert s.next_event() is P.NEED_DATA
    s.receive_data(b"")
    with pytest.raises(P.RemoteProtocolError, match="stream ended inside a PageChunk frame"):
        s.next_event()


def test_error_closes():
    c, s = opened()
    c.receive_data(s.send(P.Error(P.Code.NO_SPACE, "pages-7.img: no space")))
    ev = c.next_event()
    assert ev.code_name == "NO_SPACE" and c.state is P.State.CLOSED
    with pytest.raises(P.LocalProtocolError):
        c.send(chunk())


def test_every_event_and_state_is_documented():
    doc = open(os.path.join(ROOT, "docs", "protocol.md")).read()
    arch = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    for cls in P.EVENTS:
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper()
        assert f"| {cls.TYPE} | `{name}` |" in doc, f"{cls.__name__} missing in protocol.md"
        assert cls.__name__ in arch, f"{cls.__name__} missing in architecture.md"
    for st_ in P.State:
        assert f"`{st_.value}`" in doc


def test_boundaries_protocol_is_stdlib_only():
    import ast
    src = open(P.__file__).read()
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mods.add(node.module)
    assert not mods & {"asyncio", "socket", "ssl", "xxhash", "uvloop"}
    assert {m for m in mods if m.startswith("migrate")} <= {"migrate.errors"}


def feed_in_place(conn, data, splits=()):
    """Feed ``data`` the way asyncio.BufferedProtocol does (get_buffer, then
    buffer_updated), cut at ``splits``; return every event, releasing each."""
    out = []
    cuts = [0, *sorted(set(min(max(0, s), len(data)) for s in splits)), len(data)]
    for a, b in zip(cuts, cuts[1:]):
        while a < b:
            buf = conn.get_buffer(-1)
            n = min(len(buf), b - a)
            buf[:n] = data[a:a + n]
            conn.buffer_updated(n)
            a += n
            while (ev := conn.next_event()) is not P.NEED_DATA:
                out.append(ev)
                if isinstance(ev, P.Hello) and conn.our_role is S:
                    conn.send(P.Welcome())
    conn.receive_data(b"")
    while not isinstance(ev := conn.next_event(), P.ConnectionClosed):
        out.append(ev)
    return out


def test_large_payload_received_in_place():
    c, _ = opened()
    _, s = opened()
    pool = P.PayloadBuffers(limit=2)
    s._buffers = pool
    big = chunk(nr=2048, fill=b"\x5a")
    data = c.send(big)
    evs = []
    at = 0
    while at < len(data):              # a scratch read, then in place
        buf = s.get_buffer()
        piece = data[at:at + min(100_000, len(buf))]
        buf[:len(piece)] = piece
        s.buffer_updated(len(piece))
        at += len(piece)
        while (ev := s.next_event()) is not P.NEED_DATA:
            evs.append(ev)
    (ev,) = evs
    assert ev == big and isinstance(ev.data, memoryview)
    assert ev.data.obj in pool._free or pool.out == 1
    assert s.bytes_copied < P.Connection.SCRATCH       # only what came before the header
    s.release(ev)
    assert pool.out == 0


def test_no_free_buffer_stalls_until_release():
    c, _ = opened()
    _, s = opened()
    s._buffers = P.PayloadBuffers(limit=1)
    one, two = chunk(index=0, nr=100), chunk(index=1, nr=100)
    a, b = c.send(one), c.send(two)
    s.receive_data(a[:4096])
    assert s.next_event() is P.NEED_DATA and s.in_payload   # took the only buffer
    s.receive_data(a[4096:] + b[:4096])
    ev = s.next_event()
    assert ev == one and isinstance(ev.data, memoryview)
    assert s.next_event() is P.NEED_DATA and s.stalled
    s.release(ev)
    assert s.next_event() is P.NEED_DATA and not s.stalled and s.in_payload


def test_compressed_chunks_need_cap_zstd():
    c, s = opened()           # WELCOME granted CAP_GET only
    z = P.PageChunk(7, 0, 2, b"d" * 16, b"zstd frame", compressed=True)
    with pytest.raises(P.LocalProtocolError, match="CAP_ZSTD was not granted"):
        c.send(z)
    frame = struct.pack("<BBHI", 6, P.FLAG_ZSTD, 0, 32 + 10) + \
        struct.pack("<IIII16s", 7, 0, 2, 0, b"d" * 16) + b"zstd frame"
    s.receive_data(frame)
    with pytest.raises(P.RemoteProtocolError, match="CAP_ZSTD was not granted"):
        s.next_event()
    c2, s2 = pair()
    s2.receive_data(c2.send(P.Hello("z", caps=P.CAP_ZSTD)))
    s2.next_event()
    c2.receive_data(s2.send(P.Welcome(caps=P.CAP_ZSTD)))
    c2.next_event()
    s2.receive_data(c2.send(z))
    assert s2.next_event() == z
    with pytest.raises(P.LocalProtocolError, match="send them uncompressed"):
        c2.send(P.PageChunk(7, 1, 1, b"d" * 16, b"x" * 4097, compressed=True))


def test_join_stream_carries_only_chunks():
    token = b"t" * 16
    c, s = pair()
    s.receive_data(c.send(P.Join(token, 3)))
    assert s.next_event() == P.Join(token, 3)
    c.receive_data(s.send(P.Welcome(caps=P.CAP_STREAMS, streams=4, token=token)))
    assert c.next_event().streams == 4
    assert c.state is s.state is P.State.STREAM
    s.receive_data(c.send(chunk()))
    assert s.next_event() == chunk()
    with pytest.raises(P.LocalProtocolError, match="not allowed in state STREAM"):
        c.send(P.PagesBegin(7))
    s.receive_data(b"")
    assert isinstance(s.next_event(), P.ConnectionClosed)
    with pytest.raises(P.LocalProtocolError, match="stream 8"):
        P.Connection(C).send(P.Join(token, 8))


# ------------------------------------------------------------------ hypothesis

names = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,20}(/[A-Za-z0-9_-]{1,10}){0,3}",
                      fullmatch=True)
file_names = st.sampled_from(["core-1.img", "mm-22.img", "pagemap-3.img", "files.img",
                              "pstree.img", "fs-4.img", "fdinfo-5.img", "stats-dump.img"])
pids = st.integers(1, 1 << 22)
write_events = st.one_of(
    st.builds(P.FilePart, file_names, st.integers(0, 1 << 20), st.binary(max_size=300),
              st.booleans()),
    st.builds(P.SetParent, st.from_regex(r"(\.\./)?[a-z0-9]{1,20}", fullmatch=True)),
    st.builds(P.PagesBegin, pids),
    st.builds(lambda pid, idx, nr, b: P.PageChunk(pid, idx, nr, b * 16, b * (4096 * nr)),
              pids, st.integers(0, P.MAX_CHUNK_INDEX), st.integers(1, 3),
              st.binary(min_size=1, max_size=1)),
    st.builds(P.ZeroRange, pids, st.integers(0, 1 << 40).map(lambda x: x * 4096),
              st.integers(1, 1 << 20)),
    st.builds(P.ParentRange, pids, st.integers(0, 1 << 40).map(lambda x: x * 4096),
              st.integers(1, 1 << 20)),
)


def _session_bytes(name, evs, inv):
    c = P.Connection(C)
    s = P.Connection(S)
    out = c.send(P.Hello(name))
    s.receive_data(out)
    s.next_event()
    c.receive_data(s.send(P.Welcome()))
    c.next_event()
    body = b"".join(c.send(e) for e in evs) + c.send(P.Commit(inv))
    return out, body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names, st.lists(write_events, max_size=12), st.binary(min_size=16, max_size=64),
       st.lists(st.integers(0, 1 << 16), max_size=8))
def test_round_trip_any_split(name, evs, inv, splits):
    hello, body = _session_bytes(name, evs, inv)
    whole = events_of(P.Connection(S), hello + body)
    assert whole == [P.Hello(name), *evs, P.Commit(inv)]
    assert events_of(P.Connection(S), hello + body, splits) == whole
    # byte by byte for short streams
    if len(body) < 400:
        assert events_of(P.Connection(S), hello + body, range(len(hello + body))) == whole


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 40)), min_size=1, max_size=4),
       st.lists(st.integers(0, 200_000), max_size=6), st.integers(1, 3))
def test_in_place_receive_same_events_any_split(chunks, splits, limit):
    evs = [P.PagesBegin(7)] + [chunk(index=i, nr=nr, fill=bytes([i + 1]))
                               for i, nr in chunks]
    hello, body = _session_bytes("big", evs, b"I" * 20)
    whole = events_of(P.Connection(S), hello + body)
    s = P.Connection(S, P.PayloadBuffers(limit=limit, per_connection=limit))
    got = []
    for ev in feed_in_place(s, hello + body, splits):
        got.append(ev if not isinstance(getattr(ev, "data", None), memoryview)
                   else dataclasses.replace(ev, data=bytes(ev.data)))
        s.release(ev)
    assert got == whole
    assert s._buffers.out == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(0, 3))
def test_garbage_raises_only_protocol_error(garbage, prefix):
    s = P.Connection(S)
    if prefix:
        hello, body = _session_bytes("g", [], b"I" * 16)
        s.receive_data(hello)
        s.next_event()
        s.send(P.Welcome())
    try:
        events_of(s, garbage, [len(garbage) // 2])
    except P.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(write_events, st.integers(0, 200), st.integers(0, 255))
def test_mutated_frames_raise_only_protocol_error(ev, pos, byte):
    c, s = opened()
    data = bytearray(c.send(ev))
    data[pos % len(data)] = byte
    try:
        events_of(s, bytes(data))
    except P.ProtocolError:
        pass


# ------------------------------------------------------------------ fuzz

def malformed_frames(rng: random.Random, n: int):
    """``n`` malformed frames for a server in WRITE state, each with its kind."""
    good = [P.FilePart("core-1.img", 0, b"hello", True), P.PagesBegin(7),
            chunk(nr=1), P.ZeroRange(7, 0x1000, 3), P.SetParent("../p"),
            P.Commit(b"I" * 32)]
    kinds = ["type", "flags", "reserved", "length-lie", "length-huge", "truncated",
             "bad-field", "state", "name", "join", "zstd"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        ev = good[rng.randrange(len(good))]
        c, _ = opened()
        frame = bytearray(c.send(ev))
        if kind == "type":
            frame[0] = rng.choice([0, *range(15, 256)])
        elif kind == "flags":
            frame[1] = rng.randrange(2, 256)
        elif kind == "reserved":
            frame[2:4] = struct.pack("<H", rng.randrange(1, 65536))
        elif kind == "length-lie":
            real = len(frame) - 8
            # longer: the stream ends inside the frame; shorter: what is left
            # over (under a header's worth) is a truncated next frame.
            lie = real + rng.choice([-1, 1]) * rng.randrange(1, 8)
            frame[4:8] = struct.pack("<I", max(0, lie))
        elif kind == "length-huge":
            frame[4:8] = struct.pack("<I", rng.randrange(P.MAX_FRAME + 1, 1 << 32))
        elif kind == "truncated":
            frame = frame[:rng.randrange(1, len(frame))]
        elif kind == "bad-field":
            body = struct.pack("<IIII16s", rng.choice([0, (1 << 22) + 5, 7]),
                               rng.choice([1 << 20, 0xFFFFFFFF]),
                               rng.choice([0, 5000, 2]), rng.randrange(0, 2), b"d" * 16)
            body += b"\0" * 4096
            frame = bytearray(struct.pack("<BBHI", 6, 0, 0, len(body)) + body)
        elif kind == "state":
            frame = bytearray(struct.pack("<BBHIHHII", 2, 0, 0, 12, 1, 0, 0, 4096)
                              if rng.random() < .5 else
                              struct.pack("<BBHI", 12, 0, 0, 24) + bytes(24))
        elif kind == "join":          # only a new connection may JOIN
            frame = bytearray(struct.pack("<BBHI", 15, 0, 0, 24) + struct.pack(
                "<4sHH16s", b"MGPS", 2, rng.randrange(0, 65536), os.urandom(16)))
        elif kind == "zstd":          # a compressed chunk, CAP_ZSTD not granted
            body = struct.pack("<IIII16s", 7, 0, 2048, 0, b"d" * 16) + os.urandom(
                rng.randrange(1, 600))
            frame = bytearray(struct.pack("<BBHI", 6, P.FLAG_ZSTD, 0, len(body)) + body)
        elif kind == "name":
            name = rng.choice([b"../../etc/passwd", b"/abs", b"a\0b", b"x" * 60,
                               b"inventory.img", b"pages-1.img"])
            body = struct.pack("<QB", 0, len(name)) + name + b"data"
            frame = bytearray(struct.pack("<BBHI", 3, 0, 0, len(body)) + body)
        yield kind, bytes(frame)


def test_fuzz_10000_malformed_messages(capsys, record_property):
    rng = random.Random(4)
    refused, by_kind, accepted = 0, {}, []
    for kind, frame in malformed_frames(rng, 10_000):
        _, s = opened()
        try:
            events_of(s, frame)
        except P.RemoteProtocolError as e:
            assert "at byte" in str(e)
            refused += 1
            by_kind[kind] = by_kind.get(kind, 0) + 1
        else:
            accepted.append((kind, frame[:16]))
    record_property("fuzz_refused", refused)
    with capsys.disabled():
        print(f"\nprotocol fuzz: {refused} of 10000 malformed messages refused with "
              f"RemoteProtocolError, {len(accepted)} accepted, no other exception; "
              f"by kind: {by_kind}")
    assert not accepted, accepted[:5]
    assert refused == 10_000
