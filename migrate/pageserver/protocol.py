"""The page-server wire protocol (docs/protocol.md): framing and parsing only.

Sans-I/O, after h11: bytes in with ``receive_data``, events out with
``next_event`` (an event, ``NEED_DATA``, or ``ConnectionClosed`` at the end of
the stream), events in with ``send`` and bytes out.  No sockets, no asyncio,
no ssl, no hashing: the server, the client and the fuzzer drive it alike.

Every frame is checked as soon as its 8-byte header is complete: known type,
allowed flags, zero reserved bits, a length inside the bounds of its type,
and a type allowed in the current state from that sender.  Only then is the
payload waited for, so a lying length or a huge count never makes us buffer
more than ``MAX_FRAME``.  Errors name the byte offset in the stream.

Zero copy: besides ``receive_data``, a connection offers ``get_buffer`` and
``buffer_updated`` (the shape of ``asyncio.BufferedProtocol``).  The payload
of a large frame (over ``BIG_PAYLOAD``) is received in place into a buffer of
its own, from ``PayloadBuffers`` when one is given, and the event hands out a
view of it; ``release(ev)`` gives the buffer back.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import re
import struct

from migrate.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = [
    "VERSION", "SUPPORTED_VERSIONS", "MAGIC", "PAGE_SIZE", "MAX_FRAME", "MAX_CHUNK_PAGES",
    "MAX_GET_PAGES", "MAX_CHUNK_INDEX", "MAX_SESSION_NAME", "MAX_FILE_NAME", "MAX_LINK",
    "MAX_FILE_SIZE", "MAX_ERROR_TEXT", "MAX_OUTSTANDING_GETS", "MAX_STREAMS", "TOKEN_SIZE",
    "BIG_PAYLOAD", "MODE_WRITE", "MODE_READ", "CAP_GET", "CAP_ZSTD", "CAP_STREAMS",
    "CAP_MAP", "MAP_REMOTE", "MAP_LOCAL", "MAP_ZERO", "MAX_MAP_RUNS", "GetMap", "PageMap",
    "CAP_RUNS", "MAX_GET_RUNS", "GetRuns", "CAP_NOSYNC", "CAP_DONE", "Done",
    "FLAG_LAST", "FLAG_ZSTD", "Code", "Role", "State", "NEED_DATA", "Connection",
    "PayloadBuffers", "Hello", "Welcome", "FilePart", "SetParent", "PagesBegin",
    "PageChunk", "ZeroRange", "ParentRange", "Commit", "Committed", "Abort", "Get",
    "PageData", "Error", "Join", "ConnectionClosed", "EVENTS", "ProtocolError",
    "LocalProtocolError", "RemoteProtocolError", "check_session_name", "check_link_target",
]

VERSION = 2
SUPPORTED_VERSIONS = (2,)
MAGIC = b"MGPS"
PAGE_SIZE = 4096

MAX_CHUNK_PAGES = 2048                   # one 8 MiB checksum chunk of pages-PID.img
MAX_GET_PAGES = 2048
MAX_FRAME = MAX_CHUNK_PAGES * PAGE_SIZE + 64
MAX_CHUNK_INDEX = (1 << 17) - 1          # 1 TiB of pages per task
MAX_SESSION_NAME = 200
MAX_FILE_NAME = 64
MAX_LINK = 255
MAX_FILE_SIZE = 256 << 20
MAX_ERROR_TEXT = 1024
MAX_OUTSTANDING_GETS = 64
MAX_STREAMS = 8                          # TCP connections of one write session
TOKEN_SIZE = 16
BIG_PAYLOAD = 64 << 10                   # larger payloads are received in place

MODE_WRITE = 1
MODE_READ = 2
CAP_GET = 1
CAP_ZSTD = 2                             # PAGE_CHUNK may carry FLAG_ZSTD
CAP_STREAMS = 4                          # JOIN: more TCP streams for one session
CAP_MAP = 8                              # read sessions: GET_MAP answered (a post-copy source)
CAP_RUNS = 16                            # read sessions: GET_RUNS answered
CAP_NOSYNC = 32                          # COMMITTED without fsync (docs/protocol.md)
CAP_DONE = 64                            # read sessions: the client says DONE at its end
FLAG_LAST = 1                            # FILE_PART: the file is complete
FLAG_ZSTD = 2                            # PAGE_CHUNK: data is one zstd frame

HEADER = struct.Struct("<BBHI")          # type, flags, reserved, length
_HELLO = struct.Struct("<4sHBBI")
_WELCOME = struct.Struct("<HHII16s")
_JOIN = struct.Struct("<4sHH16s")
_FILE = struct.Struct("<QB")
_U32 = struct.Struct("<I")
_CHUNK = struct.Struct("<IIII16s")
_RANGE = struct.Struct("<IIQ")
_COMMITTED = struct.Struct("<IIQ")
_GET = struct.Struct("<IIQII")
_DATA = struct.Struct("<IIQ16s")
_ERROR = struct.Struct("<H")
_GET_MAP = struct.Struct("<II")
_MAP = struct.Struct("<IIII")
_MAP_RUN = struct.Struct("<QII")
MAP_REMOTE, MAP_LOCAL, MAP_ZERO = 1, 2, 3     # PAGE_MAP run kinds
MAX_MAP_RUNS = (MAX_FRAME - _MAP.size) // _MAP_RUN.size
MAX_GET_RUNS = 512                       # runs in one GET_RUNS


class Code(enum.IntEnum):
    """ERROR codes (docs/protocol.md)."""
    PROTOCOL = 1
    BAD_NAME = 2
    NO_SPACE = 3
    IO = 4
    CHECKSUM = 5
    BUSY = 6
    NOT_FOUND = 7
    VERSION = 8
    SHUTDOWN = 9
    ABORTED = 10


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"
    # Members are singletons compared by identity: hash them so too (Enum's
    # own __hash__ is Python code, run several times per frame).
    __hash__ = object.__hash__


class State(enum.Enum):
    __hash__ = object.__hash__        # as Role's
    AWAIT_HELLO = "AWAIT_HELLO"
    AWAIT_WELCOME_WRITE = "AWAIT_WELCOME_WRITE"
    AWAIT_WELCOME_READ = "AWAIT_WELCOME_READ"
    AWAIT_WELCOME_JOIN = "AWAIT_WELCOME_JOIN"
    WRITE = "WRITE"
    STREAM = "STREAM"
    READ = "READ"
    COMMITTING = "COMMITTING"
    DONE = "DONE"
    CLOSED = "CLOSED"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")


class _Bad(Exception):
    """A field check failed: (message, offset of the field in the payload)."""

    def __init__(self, why: str, at: int = 0, code: int = 1) -> None:
        super().__init__(why)
        self.why = why
        self.at = at
        self.code = code


_NAME_COMPONENT = re.compile(rb"[A-Za-z0-9._-]+")
# The syntax of image file names; the server also checks the name against
# images.imgfile.kind_of (this module imports nothing from migrate but errors).
_FILE_NAME = re.compile(rb"[a-z][a-z0-9_]*(-[a-z0-9_]+)*\.img")
_NOT_FILE_PART = re.compile(rb"inventory\.img|pages-[0-9]+\.img")


def check_session_name(name: bytes | str) -> str:
    """The session name rules of docs/protocol.md, or ValueError saying why."""
    b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
    if not b:
        raise ValueError("empty session name")
    if len(b) > MAX_SESSION_NAME:
        raise ValueError(f"session name of {len(b)} bytes, the limit is {MAX_SESSION_NAME}")
    if b"\0" in b:
        raise ValueError("session name holds a NUL byte")
    if b.startswith(b"/"):
        raise ValueError(f"session name {b[:60]!r} is an absolute path")
    for comp in b.split(b"/"):
        if comp in (b".", b".."):
            raise ValueError(f"session name {b[:60]!r} has a {comp.decode()!r} component")
        if not _NAME_COMPONENT.fullmatch(comp):
            raise ValueError(f"session name {b[:60]!r}: components are made of "
                             "[A-Za-z0-9._-]")
    return b.decode()


def check_link_target(target: bytes | str) -> str:
    b = target.encode("utf-8", "surrogateescape") if isinstance(target, str) else bytes(target)
    if not b or len(b) > MAX_LINK:
        raise ValueError(f"parent link target of {len(b)} bytes (1..{MAX_LINK})")
    if b"\0" in b:
        raise ValueError("parent link target holds a NUL byte")
    if b.startswith(b"/"):
        raise ValueError(f"parent link target {b[:60]!r} is absolute")
    try:
        return b.decode()
    except UnicodeDecodeError:
        raise ValueError("parent link target is not UTF-8") from None


def _check_file_name(b: bytes) -> str:
    if not _FILE_NAME.fullmatch(b) or _NOT_FILE_PART.fullmatch(b):
        raise ValueError(f"file name {b[:MAX_FILE_NAME]!r} is not an image file this "
                         "message may carry")
    return bytes(b).decode()


def _text(b: bytes, what: str) -> str:
    try:
        return bytes(b).decode()      # a memoryview in a large frame
    except UnicodeDecodeError as e:
        raise _Bad(f"{what} is not UTF-8", e.start) from None


# ------------------------------------------------------------------ events
# Each event knows its type code, the bounds of its payload length, its
# allowed flags, how to check itself, and how to encode and decode itself.

@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """C->S, opens a session: its name, mode (MODE_WRITE or MODE_READ), caps,
    and how many TCP streams the client would like to use (CAP_STREAMS)."""
    name: str
    mode: int = MODE_WRITE
    caps: int = 0
    version: int = VERSION
    streams: int = 1
    TYPE = 1
    BOUNDS = (_HELLO.size, _HELLO.size + MAX_SESSION_NAME)

    def check(self) -> None:
        if self.mode not in (MODE_WRITE, MODE_READ):
            raise _Bad(f"mode {self.mode} (1 write, 2 read)", 6)
        if not 0 <= self.streams <= MAX_STREAMS or (self.mode == MODE_READ
                                                      and self.streams > 1):
            raise _Bad(f"streams {self.streams} (0..{MAX_STREAMS}, 1 for a read session)", 7)
        if not 0 <= self.version <= 0xFFFF or not 0 <= self.caps <= 0xFFFFFFFF:
            raise _Bad("version or caps out of range", 4)
        try:
            check_session_name(self.name)
        except (ValueError, UnicodeEncodeError) as e:
            raise _Bad(str(e), _HELLO.size, Code.BAD_NAME) from None

    def encode(self) -> tuple[int, list]:
        return 0, [_HELLO.pack(MAGIC, self.version, self.mode, self.streams, self.caps),
                   self.name.encode()]

    @classmethod
    def decode(cls, flags: int, p: bytes) -> "Hello":
        magic, version, mode, streams, caps = _HELLO.unpack_from(p)
        if magic != MAGIC:
            raise _Bad(f"bad magic {magic!r}, expected {MAGIC!r}: not a migrate page-server "
                       "client", 0)
        return cls(_text(p[_HELLO.size:], "session name"), mode, caps, version, streams)


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome:
    """S->C, accepts the session (or a JOINed stream): the version, the
    capabilities and the number of streams granted, and the token that
    further streams of this session present in their JOIN."""
    version: int = VERSION
    caps: int = 0
    max_frame: int = MAX_FRAME
    streams: int = 1
    token: bytes = bytes(TOKEN_SIZE)
    TYPE = 2
    BOUNDS = (_WELCOME.size, _WELCOME.size)

    def check(self) -> None:
        if not 0 <= self.version <= 0xFFFF or not 0 <= self.caps <= 0xFFFFFFFF:
            raise _Bad("version or caps out of range")
        if not 0 < self.max_frame <= 0xFFFFFFFF:
            raise _Bad(f"max_frame {self.max_frame}", 8)
        if not 1 <= self.streams <= MAX_STREAMS:
            raise _Bad(f"streams {self.streams} (1..{MAX_STREAMS})", 2)
        if len(self.token) != TOKEN_SIZE:
            raise _Bad(f"token is not {TOKEN_SIZE} bytes", 12)

    def encode(self):
        return 0, [_WELCOME.pack(self.version, self.streams, self.caps, self.max_frame,
                                 self.token)]

    @classmethod
    def decode(cls, flags, p):
        version, streams, caps, max_frame, token = _WELCOME.unpack(p)
        return cls(version, caps, max_frame, streams, token)


@dataclasses.dataclass(frozen=True, slots=True)
class FilePart:
    """C->S, bytes [offset, offset + len(data)) of a records image file."""
    name: str
    offset: int
    data: bytes
    last: bool = False
    TYPE = 3
    BOUNDS = (_FILE.size + 1, MAX_FRAME)
    FLAGS = FLAG_LAST

    def check(self) -> None:
        try:
            b = self.name.encode()
            _check_file_name(b)
        except (ValueError, UnicodeEncodeError) as e:
            raise _Bad(str(e), _FILE.size, Code.BAD_NAME) from None
        if self.offset < 0 or self.offset + len(self.data) > MAX_FILE_SIZE:
            raise _Bad(f"{self.name}: part [{self.offset}, +{len(self.data)}) is past "
                       f"MAX_FILE_SIZE {MAX_FILE_SIZE}", 0)
        if _FILE.size + len(b) + len(self.data) > MAX_FRAME:
            raise _Bad(f"{self.name}: part of {len(self.data)} bytes exceeds MAX_FRAME")

    def encode(self):
        b = self.name.encode()
        return (FLAG_LAST if self.last else 0), [_FILE.pack(self.offset, len(b)) + b,
                                                 self.data]

    @classmethod
    def decode(cls, flags, p):
        offset, n = _FILE.unpack_from(p)
        if n == 0 or n > MAX_FILE_NAME:
            raise _Bad(f"file name length {n} (1..{MAX_FILE_NAME})", 8)
        if _FILE.size + n > len(p):
            raise _Bad(f"file name length {n} runs past the payload ({len(p)} bytes)", 8)
        return cls(_text(p[_FILE.size:_FILE.size + n], "file name"), offset,
                   p[_FILE.size + n:], bool(flags & FLAG_LAST))


@dataclasses.dataclass(frozen=True, slots=True)
class SetParent:
    """C->S, the ``parent`` symlink of an incremental image."""
    target: str
    TYPE = 4
    BOUNDS = (1, MAX_LINK)

    def check(self) -> None:
        try:
            check_link_target(self.target)
        except (ValueError, UnicodeEncodeError) as e:
            raise _Bad(str(e), 0, Code.BAD_NAME) from None

    def encode(self):
        return 0, [self.target.encode()]

    @classmethod
    def decode(cls, flags, p):
        return cls(_text(p, "parent link target"))


def _check_req(req_id: int, pid: int) -> None:
    if not 0 <= req_id <= 0xFFFFFFFF:
        raise _Bad(f"req_id {req_id}")
    _check_pid(pid)


def _check_pid(pid: int) -> None:
    if not 0 < pid < (1 << 22) + 1:     # pid_max is at most 4194304 (man 5 proc)
        raise _Bad(f"pid {pid} out of range", 0)


@dataclasses.dataclass(frozen=True, slots=True)
class PagesBegin:
    """C->S, creates pages-PID.img; its chunks follow."""
    pid: int
    TYPE = 5
    BOUNDS = (4, 4)

    def check(self) -> None:
        _check_pid(self.pid)

    def encode(self):
        return 0, [_U32.pack(self.pid)]

    @classmethod
    def decode(cls, flags, p):
        return cls(_U32.unpack(p)[0])


def _check_pages(data_len: int, nr_pages: int, limit: int, at: int) -> None:
    if not 0 < nr_pages <= limit:
        raise _Bad(f"nr_pages {nr_pages} (1..{limit})", at)
    if data_len != nr_pages * PAGE_SIZE:
        raise _Bad(f"nr_pages {nr_pages} but {data_len} bytes of data", at)


@dataclasses.dataclass(frozen=True, slots=True)
class PageChunk:
    """C->S, chunk ``index`` of pages-PID.img with the xxh3-128 of its data.
    ``compressed``: ``data`` is one zstd frame of the ``nr_pages`` pages (the
    digest is of the pages), no longer than them; only once CAP_ZSTD is granted."""
    pid: int
    index: int
    nr_pages: int
    digest: bytes
    data: bytes
    compressed: bool = False
    TYPE = 6
    BOUNDS = (_CHUNK.size + 1, _CHUNK.size + MAX_CHUNK_PAGES * PAGE_SIZE)
    FLAGS = FLAG_ZSTD

    def check(self) -> None:
        _check_pid(self.pid)
        if not 0 <= self.index <= MAX_CHUNK_INDEX:
            raise _Bad(f"chunk index {self.index} (0..{MAX_CHUNK_INDEX})", 4)
        if self.compressed:
            if not 0 < self.nr_pages <= MAX_CHUNK_PAGES:
                raise _Bad(f"nr_pages {self.nr_pages} (1..{MAX_CHUNK_PAGES})", 8)
            if not 0 < len(self.data) <= self.nr_pages * PAGE_SIZE:
                raise _Bad(f"{len(self.data)} compressed bytes for {self.nr_pages} pages "
                           "(send them uncompressed)", 8)
        else:
            _check_pages(len(self.data), self.nr_pages, MAX_CHUNK_PAGES, 8)
        if len(self.digest) != 16:
            raise _Bad("digest is not 16 bytes", 16)

    def parts(self):
        return [_CHUNK.pack(self.pid, self.index, self.nr_pages, 0, self.digest), self.data]

    def encode(self):
        return (FLAG_ZSTD if self.compressed else 0), self.parts()

    @classmethod
    def decode(cls, flags, p):
        pid, index, nr, res, digest = _CHUNK.unpack_from(p)
        if res:
            raise _Bad("reserved field is not 0", 12)
        return cls(pid, index, nr, digest, memoryview(p)[_CHUNK.size:],
                   bool(flags & FLAG_ZSTD))


@dataclasses.dataclass(frozen=True, slots=True)
class ZeroRange:
    """C->S, pages of pid that read as zeros (sent as a range, never as data)."""
    pid: int
    vaddr: int
    nr_pages: int
    TYPE = 7
    BOUNDS = (_RANGE.size, _RANGE.size)

    def check(self) -> None:
        _check_pid(self.pid)
        if not 0 < self.nr_pages <= 0xFFFFFFFF:
            raise _Bad(f"nr_pages {self.nr_pages}", 4)
        if self.vaddr % PAGE_SIZE or not 0 <= self.vaddr < (1 << 64) - self.nr_pages * PAGE_SIZE:
            raise _Bad(f"vaddr {self.vaddr:#x} is not page aligned or the range wraps", 8)

    def encode(self):
        return 0, [_RANGE.pack(self.pid, self.nr_pages, self.vaddr)]

    @classmethod
    def decode(cls, flags, p):
        pid, nr, vaddr = _RANGE.unpack(p)
        return cls(pid, vaddr, nr)


@dataclasses.dataclass(frozen=True, slots=True)
class ParentRange(ZeroRange):
    """C->S, pages of pid that are found in the parent image."""
    TYPE = 8


@dataclasses.dataclass(frozen=True, slots=True)
class Commit:
    """C->S, the bytes of inventory.img: every file's size and xxh3-128."""
    inventory: bytes
    TYPE = 9
    BOUNDS = (16, MAX_FRAME)

    def check(self) -> None:
        if not 16 <= len(self.inventory) <= MAX_FRAME:
            raise _Bad(f"inventory of {len(self.inventory)} bytes (16..{MAX_FRAME})")

    def encode(self):
        return 0, [self.inventory]

    @classmethod
    def decode(cls, flags, p):
        return cls(bytes(p))


@dataclasses.dataclass(frozen=True, slots=True)
class Committed:
    """S->C, everything is written and synced, inventory.img last."""
    nr_files: int
    nbytes: int
    TYPE = 10
    BOUNDS = (_COMMITTED.size, _COMMITTED.size)

    def check(self) -> None:
        if not 0 <= self.nr_files <= 0xFFFFFFFF or not 0 <= self.nbytes < 1 << 64:
            raise _Bad("count out of range")

    def encode(self):
        return 0, [_COMMITTED.pack(self.nr_files, 0, self.nbytes)]

    @classmethod
    def decode(cls, flags, p):
        n, res, nbytes = _COMMITTED.unpack(p)
        if res:
            raise _Bad("reserved field is not 0", 4)
        return cls(n, nbytes)


@dataclasses.dataclass(frozen=True, slots=True)
class Abort:
    """C->S, drop the session: the server removes what it wrote."""
    reason: str = ""
    TYPE = 11
    BOUNDS = (0, MAX_ERROR_TEXT)

    def check(self) -> None:
        if len(self.reason.encode()) > MAX_ERROR_TEXT:
            raise _Bad(f"reason over {MAX_ERROR_TEXT} bytes")

    def encode(self):
        return 0, [self.reason.encode()]

    @classmethod
    def decode(cls, flags, p):
        return cls(_text(p, "abort reason"))


@dataclasses.dataclass(frozen=True, slots=True)
class Get:
    """C->S (read sessions), pages [vaddr, vaddr + nr_pages * 4096) of pid."""
    req_id: int
    pid: int
    vaddr: int
    nr_pages: int
    TYPE = 12
    BOUNDS = (_GET.size, _GET.size)

    def check(self) -> None:
        _check_req(self.req_id, self.pid)
        if not 0 < self.nr_pages <= MAX_GET_PAGES:
            raise _Bad(f"nr_pages {self.nr_pages} (1..{MAX_GET_PAGES})", 16)
        if self.vaddr % PAGE_SIZE or not 0 <= self.vaddr < (1 << 64) - self.nr_pages * PAGE_SIZE:
            raise _Bad(f"vaddr {self.vaddr:#x} is not page aligned or the range wraps", 8)

    def encode(self):
        return 0, [_GET.pack(self.req_id, self.pid, self.vaddr, self.nr_pages, 0)]

    @classmethod
    def decode(cls, flags, p):
        req, pid, vaddr, nr, res = _GET.unpack(p)
        if res:
            raise _Bad("reserved field is not 0", 20)
        return cls(req, pid, vaddr, nr)


@dataclasses.dataclass(frozen=True, slots=True)
class PageData:
    """S->C, the answer to a Get: the data and its xxh3-128."""
    req_id: int
    vaddr: int
    nr_pages: int
    digest: bytes
    data: bytes
    TYPE = 13
    BOUNDS = (_DATA.size + PAGE_SIZE, _DATA.size + MAX_GET_PAGES * PAGE_SIZE)

    def check(self) -> None:
        if not 0 <= self.req_id <= 0xFFFFFFFF or self.vaddr % PAGE_SIZE \
                or not 0 <= self.vaddr < 1 << 64:
            raise _Bad(f"req_id {self.req_id} or vaddr {self.vaddr:#x}")
        _check_pages(len(self.data), self.nr_pages, MAX_GET_PAGES, 4)
        if len(self.digest) != 16:
            raise _Bad("digest is not 16 bytes", 16)

    def parts(self):
        return [_DATA.pack(self.req_id, self.nr_pages, self.vaddr, self.digest), self.data]

    def encode(self):
        return 0, self.parts()

    @classmethod
    def decode(cls, flags, p):
        req, nr, vaddr, digest = _DATA.unpack_from(p)
        return cls(req, vaddr, nr, digest, memoryview(p)[_DATA.size:])


@dataclasses.dataclass(frozen=True, slots=True)
class GetMap:
    """C->S (read sessions, once CAP_MAP is granted): which of pid's lazy
    pages (PE_LAZY in the image) the server holds, which the client's own
    image chain holds, and which are zero.  Answered in order, like a GET,
    by one or more PAGE_MAP frames."""
    req_id: int
    pid: int
    TYPE = 16
    BOUNDS = (_GET_MAP.size, _GET_MAP.size)

    def check(self) -> None:
        _check_req(self.req_id, self.pid)

    def encode(self):
        return 0, [_GET_MAP.pack(self.req_id, self.pid)]

    @classmethod
    def decode(cls, flags, p):
        return cls(*_GET_MAP.unpack(p))


@dataclasses.dataclass(frozen=True, slots=True)
class PageMap:
    """S->C, (part of) the answer to a GetMap: runs (vaddr, nr_pages, kind)
    in address order, kind MAP_REMOTE (GET it from this server), MAP_LOCAL
    (the client's image chain holds it as it is now) or MAP_ZERO (no data:
    the zero page).  Flag LAST on the answer's last frame."""
    req_id: int
    pid: int
    runs: tuple
    last: bool = True
    TYPE = 17
    FLAGS = FLAG_LAST
    BOUNDS = (_MAP.size, _MAP.size + MAX_MAP_RUNS * _MAP_RUN.size)

    def check(self) -> None:
        _check_req(self.req_id, self.pid)
        if len(self.runs) > MAX_MAP_RUNS:
            raise _Bad(f"{len(self.runs)} runs (at most {MAX_MAP_RUNS})", 8)
        end = 0
        kinds = (MAP_REMOTE, MAP_LOCAL, MAP_ZERO)
        for vaddr, nr, kind in self.runs:      # (one loop, no calls: maps are long)
            if vaddr & 0xFFF or vaddr < end or nr <= 0 or nr > 0xFFFFFFFF \
                    or kind not in kinds:
                break
            end = vaddr + nr * PAGE_SIZE
        else:
            if end <= 1 << 64:
                return
        for i, (vaddr, nr, kind) in enumerate(self.runs):   # say which, and where
            at = _MAP.size + i * _MAP_RUN.size
            if vaddr % PAGE_SIZE or not 0 < nr <= 0xFFFFFFFF \
                    or vaddr + nr * PAGE_SIZE > 1 << 64 or \
                    (i and vaddr < self.runs[i - 1][0] + self.runs[i - 1][1] * PAGE_SIZE):
                raise _Bad(f"run {i} ({vaddr:#x}, {nr} pages): not page aligned, empty, "
                           "wrapping or not after the run before it", at)
            if kind not in kinds:
                raise _Bad(f"run {i}: kind {kind}", at + 12)

    def encode(self):
        n = len(self.runs)
        body = struct.pack(f"<IIII{'QII' * n}", self.req_id, self.pid, n, 0,
                           *itertools.chain.from_iterable(self.runs))
        return (FLAG_LAST if self.last else 0), [body]

    @classmethod
    def decode(cls, flags, p):
        req, pid, n, res = _MAP.unpack_from(p)
        if res:
            raise _Bad("reserved field is not 0", 12)
        if len(p) != _MAP.size + n * _MAP_RUN.size:
            raise _Bad(f"{n} runs do not fill the payload of {len(p)} bytes", 8)
        runs = tuple(_MAP_RUN.iter_unpack(memoryview(p)[_MAP.size:]))
        return cls(req, pid, runs, bool(flags & FLAG_LAST))


@dataclasses.dataclass(frozen=True, slots=True)
class GetRuns:
    """C->S (read sessions, once CAP_RUNS is granted): several runs of pid's
    pages, (vaddr, nr_pages) in address order, not overlapping, at most
    MAX_GET_PAGES pages in all.  Answered in order by one PAGE_DATA whose
    data is the runs' pages one after the other (its vaddr: the first
    run's): scattered pages for the price of one GET."""
    req_id: int
    pid: int
    runs: tuple
    TYPE = 18
    BOUNDS = (_MAP.size + _MAP_RUN.size, _MAP.size + MAX_GET_RUNS * _MAP_RUN.size)

    @property
    def nr_pages(self) -> int:
        return sum(n for _, n in self.runs)

    def check(self) -> None:
        _check_req(self.req_id, self.pid)
        if not 1 <= len(self.runs) <= MAX_GET_RUNS:
            raise _Bad(f"{len(self.runs)} runs (1..{MAX_GET_RUNS})", 8)
        end = total = 0
        for i, (vaddr, nr) in enumerate(self.runs):
            at = _MAP.size + i * _MAP_RUN.size
            if vaddr % PAGE_SIZE or vaddr < end or not 0 < nr <= MAX_GET_PAGES \
                    or vaddr + nr * PAGE_SIZE > 1 << 64:
                raise _Bad(f"run {i} ({vaddr:#x}, {nr} pages): not page aligned, empty, "
                           "too long, wrapping or not after the run before it", at)
            end = vaddr + nr * PAGE_SIZE
            total += nr
        if total > MAX_GET_PAGES:
            raise _Bad(f"{total} pages in all (at most {MAX_GET_PAGES})", 8)

    def encode(self):
        body = bytearray(_MAP.size + len(self.runs) * _MAP_RUN.size)
        _MAP.pack_into(body, 0, self.req_id, self.pid, len(self.runs), 0)
        off = _MAP.size
        for vaddr, nr in self.runs:
            _MAP_RUN.pack_into(body, off, vaddr, nr, 0)
            off += _MAP_RUN.size
        return 0, [bytes(body)]

    @classmethod
    def decode(cls, flags, p):
        req, pid, n, res = _MAP.unpack_from(p)
        if res:
            raise _Bad("reserved field is not 0", 12)
        if len(p) != _MAP.size + n * _MAP_RUN.size:
            raise _Bad(f"{n} runs do not fill the payload of {len(p)} bytes", 8)
        runs = []
        for i, (vaddr, nr, r) in enumerate(_MAP_RUN.iter_unpack(memoryview(p)[_MAP.size:])):
            if r:
                raise _Bad(f"run {i}: reserved field is not 0", _MAP.size + i * 16 + 12)
            runs.append((vaddr, nr))
        return cls(req, pid, tuple(runs))


@dataclasses.dataclass(frozen=True, slots=True)
class Error:
    """Either way: what went wrong; the connection closes after it."""
    code: int
    text: str = ""
    TYPE = 14
    BOUNDS = (_ERROR.size, _ERROR.size + MAX_ERROR_TEXT)

    def check(self) -> None:
        if not 0 <= self.code <= 0xFFFF:
            raise _Bad(f"error code {self.code}")
        if len(self.text.encode()) > MAX_ERROR_TEXT:
            raise _Bad(f"error text over {MAX_ERROR_TEXT} bytes", 2)

    def encode(self):
        return 0, [_ERROR.pack(self.code), self.text.encode()]

    @classmethod
    def decode(cls, flags, p):
        (code,) = _ERROR.unpack_from(p)
        return cls(code, p[_ERROR.size:].decode("utf-8", "replace"))

    @property
    def code_name(self) -> str:
        try:
            return Code(self.code).name
        except ValueError:
            return str(self.code)


@dataclasses.dataclass(frozen=True, slots=True)
class Done:
    """C->S (read sessions, once CAP_DONE is granted): the client has every
    page it wants from this session; the connection closes after it.  A
    post-copy source ends on it (its frozen process is no longer needed),
    not on its connections closing."""
    TYPE = 19
    BOUNDS = (0, 0)

    def check(self) -> None:
        pass

    def encode(self):
        return 0, [b""]

    @classmethod
    def decode(cls, flags, p):
        return cls()


@dataclasses.dataclass(frozen=True, slots=True)
class Join:
    """C->S, opens one more TCP stream of the write session whose WELCOME
    gave ``token``; ``stream`` numbers it (1..granted-1)."""
    token: bytes
    stream: int
    version: int = VERSION
    TYPE = 15
    BOUNDS = (_JOIN.size, _JOIN.size)

    def check(self) -> None:
        if not 0 <= self.version <= 0xFFFF:
            raise _Bad(f"version {self.version}", 4)
        if not 1 <= self.stream < MAX_STREAMS:
            raise _Bad(f"stream {self.stream} (1..{MAX_STREAMS - 1})", 6)
        if len(self.token) != TOKEN_SIZE:
            raise _Bad(f"token is not {TOKEN_SIZE} bytes", 8)

    def encode(self):
        return 0, [_JOIN.pack(MAGIC, self.version, self.stream, self.token)]

    @classmethod
    def decode(cls, flags, p):
        magic, version, stream, token = _JOIN.unpack(p)
        if magic != MAGIC:
            raise _Bad(f"bad magic {magic!r}, expected {MAGIC!r}: not a migrate page-server "
                       "client", 0)
        return cls(token, stream, version)


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer ended the stream (not a frame)."""


EVENTS = (Hello, Welcome, FilePart, SetParent, PagesBegin, PageChunk, ZeroRange,
          ParentRange, Commit, Committed, Abort, Get, PageData, Error, Join, GetMap, PageMap,
          GetRuns, Done)
_BY_TYPE = {cls.TYPE: cls for cls in EVENTS}
_EVENT_TYPES = frozenset(EVENTS)


# ------------------------------------------------------------------ state table
C, S = Role.CLIENT, Role.SERVER
_ST = State
# (state, sender, key) -> next state; key is the event class, or (Hello, mode).
TRANSITIONS: dict = {
    (_ST.AWAIT_HELLO, C, (Hello, MODE_WRITE)): _ST.AWAIT_WELCOME_WRITE,
    (_ST.AWAIT_HELLO, C, (Hello, MODE_READ)): _ST.AWAIT_WELCOME_READ,
    (_ST.AWAIT_WELCOME_WRITE, S, Welcome): _ST.WRITE,
    (_ST.AWAIT_WELCOME_READ, S, Welcome): _ST.READ,
    (_ST.AWAIT_HELLO, C, Join): _ST.AWAIT_WELCOME_JOIN,
    (_ST.AWAIT_WELCOME_JOIN, S, Welcome): _ST.STREAM,
    (_ST.STREAM, C, PageChunk): _ST.STREAM,
    **{(_ST.WRITE, C, cls): _ST.WRITE
       for cls in (FilePart, SetParent, PagesBegin, PageChunk, ZeroRange, ParentRange)},
    (_ST.WRITE, C, Commit): _ST.COMMITTING,
    (_ST.WRITE, C, Abort): _ST.CLOSED,
    (_ST.COMMITTING, S, Committed): _ST.DONE,
    (_ST.READ, C, Get): _ST.READ,
    (_ST.READ, S, PageData): _ST.READ,
    (_ST.READ, C, GetMap): _ST.READ,
    (_ST.READ, C, GetRuns): _ST.READ,
    (_ST.READ, S, PageMap): _ST.READ,
    (_ST.READ, C, Done): _ST.CLOSED,
    **{(st, who, Error): _ST.CLOSED for st in State if st is not _ST.CLOSED
       for who in (C, S)},
}
_ALLOWED = collections.defaultdict(set)
for (_s, _who, _key) in TRANSITIONS:
    _ALLOWED[(_s, _who)].add(_key[0] if isinstance(_key, tuple) else _key)


def _key(ev):
    return (Hello, ev.mode) if isinstance(ev, Hello) else type(ev)


class PayloadBuffers:
    """Receive buffers of ``MAX_FRAME`` bytes for large payloads, shared by
    every connection of a server, so that its memory stays bounded however
    many sessions run: at most ``limit`` exist, made when first needed and
    kept.  A connection holds at most ``per_connection`` (receive the next
    frame while the last one is being written).  When ``take`` says None the
    connection waits (``Connection.stalled``) until some buffer is given
    back; ``on_free``, if set, is called then."""

    def __init__(self, limit: int = 6, per_connection: int = 2) -> None:
        self.limit = limit
        self.per_connection = per_connection
        self._free: list[bytearray] = []
        self.out = 0
        self.on_free = None

    def take(self, held: int) -> bytearray | None:
        if held >= self.per_connection or self.out >= self.limit:
            return None
        self.out += 1
        return self._free.pop() if self._free else bytearray(MAX_FRAME)

    def give(self, buf: bytearray) -> None:
        self.out -= 1
        self._free.append(buf)
        if self.on_free is not None:
            self.on_free()


class Connection:
    """One end of one connection: ``Connection(Role.SERVER)`` or CLIENT.

    ``buffers``: a ``PayloadBuffers`` for large payloads; without one each
    large payload gets a new buffer of its exact size.
    """

    MAX_BUFFER = MAX_FRAME + HEADER.size + (4 << 20)
    SCRATCH = 64 << 10

    def __init__(self, role: Role, buffers: PayloadBuffers | None = None) -> None:
        self.our_role = role
        self.their_role = S if role is C else C
        self.state = State.AWAIT_HELLO
        self.mode = 0
        self.caps = 0                # granted in WELCOME
        self._buf = bytearray()
        self._pos = 0                # stream offset of _buf[0]
        self._eof = False
        self._gets: collections.deque = collections.deque()
        self.bytes_received = 0
        self.bytes_copied = 0        # of large payloads, before they had their buffer
        self.bytes_sent = 0
        self._buffers = buffers
        self._held: dict[int, bytearray] = {}     # id -> pool buffer lent to events
        self._payload: memoryview | None = None   # a large payload being received
        self._filled = 0
        self._frame = None                        # (cls, flags, start) of that frame
        self._scratch = memoryview(bytearray(self.SCRATCH))
        self._into_payload = False
        self.stalled = False     # a large frame waits for a buffer: release() one

    # -- receiving -----------------------------------------------------------
    @property
    def offset(self) -> int:
        """Stream offset of the next unparsed byte."""
        return self._pos

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed, outside a large payload."""
        return len(self._buf)

    @property
    def in_payload(self) -> bool:
        """The bytes now expected go into a large payload, in place."""
        return self._payload is not None and self._filled < len(self._payload)

    def receive_data(self, data) -> None:
        """Buffer bytes from the peer; ``b""`` means end of stream."""
        if self._eof:
            raise LocalProtocolError("receive_data after the end of the stream")
        if not data:
            self._eof = True
            return
        mv = memoryview(data)
        self.bytes_received += len(mv)
        if self.in_payload:
            n = min(len(mv), len(self._payload) - self._filled)
            self._payload[self._filled:self._filled + n] = mv[:n]
            self._filled += n
            mv = mv[n:]
            if not mv:
                return
        if len(self._buf) > self.MAX_BUFFER:
            raise LocalProtocolError(f"receive buffer over {self.MAX_BUFFER} bytes: "
                                     "call next_event() before receiving more")
        self._buf += mv

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes from the peer go (asyncio.BufferedProtocol):
        the rest of a large payload, in place, or else a scratch area."""
        self._into_payload = self.in_payload
        if self._into_payload:
            return self._payload[self._filled:]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of the last ``get_buffer()``."""
        if self._into_payload:
            self._filled += nbytes
            self.bytes_received += nbytes
        else:
            self.receive_data(self._scratch[:nbytes])

    def release(self, ev) -> None:
        """Give back the buffer that ``ev`` (a PageChunk, FilePart or PageData
        from next_event) lends its data from; use its data no more."""
        data = getattr(ev, "data", None)
        if isinstance(data, memoryview):
            self._give(data)

    def release_all(self) -> None:
        """The connection is done: give back every buffer it holds."""
        held, self._held = self._held, {}
        if self._buffers is not None:
            for buf in held.values():
                self._buffers.give(buf)
        self._payload = None

    def _remote(self, why: str, at: int, code: int = 1) -> RemoteProtocolError:
        """The error, with ``offset`` and ``code`` (the ERROR code to answer with)."""
        e = RemoteProtocolError(f"{why} (at byte {at} of the stream from the "
                                f"{self.their_role.value})")
        e.offset = at
        e.code = code
        return e

    def _storage(self, length: int) -> memoryview | None:
        if self._buffers is None:
            return memoryview(bytearray(length))
        buf = self._buffers.take(len(self._held))
        if buf is None:
            return None
        self._held[id(buf)] = buf
        return memoryview(buf)[:length]

    def next_event(self):
        self.stalled = False
        if self._payload is not None:
            return self._large_frame()
        buf = self._buf
        if len(buf) < HEADER.size:
            if self._eof:
                if buf:
                    raise self._remote(f"stream ended inside a frame header "
                                       f"({len(buf)} of {HEADER.size} bytes)", self._pos)
                return ConnectionClosed()
            return NEED_DATA
        typ, flags, res, length = HEADER.unpack_from(buf)
        cls = self._check_header(typ, flags, res, length)
        end = HEADER.size + length
        start = self._pos
        if len(buf) < end:
            if self._eof:
                raise self._remote(f"stream ended inside a {cls.__name__} frame: "
                                   f"{len(buf) - HEADER.size} of {length} payload bytes",
                                   self._pos)
            if length <= BIG_PAYLOAD:
                return NEED_DATA
            # Receive the rest in place: what is buffered (at most a scratch
            # read past the header) is the only part copied.
            storage = self._storage(length)
            if storage is None:
                self.stalled = True
                return NEED_DATA
            have = len(buf) - HEADER.size
            storage[:have] = memoryview(buf)[HEADER.size:]
            self.bytes_copied += have
            del buf[:]
            self._payload, self._filled = storage, have
            self._frame = (cls, flags, start)
            self._pos += end
            return self._large_frame()
        payload = bytes(buf[HEADER.size:end])
        del buf[:end]
        self._pos += end
        return self._event(cls, flags, payload, start)

    def _large_frame(self):
        cls, flags, start = self._frame
        if self._filled < len(self._payload):
            if self._eof:
                raise self._remote(f"stream ended inside a {cls.__name__} frame: "
                                   f"{self._filled} of {len(self._payload)} payload bytes",
                                   start)
            return NEED_DATA
        payload, self._payload = self._payload, None
        try:
            ev = self._event(cls, flags, payload, start)
        except RemoteProtocolError:
            self._give(payload)     # (buffers lent to earlier events stay lent)
            raise
        if not isinstance(getattr(ev, "data", None), memoryview):
            self._give(payload)     # the event copied what it keeps
        return ev

    def _give(self, view: memoryview) -> None:
        buf = self._held.pop(id(view.obj), None)
        if buf is not None:
            self._buffers.give(buf)

    def _event(self, cls, flags, payload, start):
        try:
            ev = cls.decode(flags, payload)
            ev.check()
        except _Bad as e:
            raise self._remote(f"{cls.__name__}: {e.why}", start + HEADER.size + e.at,
                               e.code) from None
        except struct.error as e:
            raise self._remote(f"{cls.__name__}: {e}", start + HEADER.size) from None
        try:
            self._transition(self.their_role, ev)
        except _Bad as e:
            raise self._remote(e.why, start) from None
        return ev

    def _check_header(self, typ: int, flags: int, res: int, length: int):
        at = self._pos
        cls = _BY_TYPE.get(typ)
        if cls is None:
            raise self._remote(f"unknown message type {typ}", at)
        if flags & ~getattr(cls, "FLAGS", 0):
            raise self._remote(f"{cls.__name__}: flags {flags:#x} not allowed", at + 1)
        if flags & FLAG_ZSTD and cls is PageChunk and not self.caps & CAP_ZSTD:
            raise self._remote("PageChunk: compressed, but CAP_ZSTD was not granted", at + 1)
        if cls is GetMap and not self.caps & CAP_MAP:
            raise self._remote("GetMap: CAP_MAP was not granted", at)
        if cls is GetRuns and not self.caps & CAP_RUNS:
            raise self._remote("GetRuns: CAP_RUNS was not granted", at)
        if cls is Done and not self.caps & CAP_DONE:
            raise self._remote("Done: CAP_DONE was not granted", at)
        if res:
            raise self._remote(f"{cls.__name__}: reserved header field {res:#x} is not 0",
                               at + 2)
        lo, hi = cls.BOUNDS
        if cls in (PageChunk, PageData) and not flags & FLAG_ZSTD:
            lo = _CHUNK.size + PAGE_SIZE         # the same for PageData (_DATA)
        if not lo <= length <= hi:
            raise self._remote(f"{cls.__name__}: payload length {length} outside "
                               f"{lo}..{hi}", at + 4)
        if cls in (PageChunk, PageData) and not flags & FLAG_ZSTD \
                and (length - lo) % PAGE_SIZE:
            raise self._remote(f"{cls.__name__}: payload length {length} is not a whole "
                               "number of pages", at + 4)
        if cls not in _ALLOWED[(self.state, self.their_role)]:
            raise self._remote(f"{cls.__name__} from the {self.their_role.value} not "
                               f"allowed in state {self.state.value}", at)
        return cls

    # -- sending -------------------------------------------------------------
    def send_parts(self, ev) -> list:
        """The frame of ``ev`` as a list of buffers (page data is not copied)."""
        if isinstance(ev, ConnectionClosed):
            raise LocalProtocolError("ConnectionClosed is not sent: close the transport")
        if type(ev) not in _EVENT_TYPES:
            raise LocalProtocolError(f"not an event: {ev!r}")
        try:
            ev.check()
            if isinstance(ev, PageChunk) and ev.compressed and not self.caps & CAP_ZSTD:
                raise _Bad("compressed, but CAP_ZSTD was not granted")
            if isinstance(ev, GetMap) and not self.caps & CAP_MAP:
                raise _Bad("CAP_MAP was not granted")
            if isinstance(ev, GetRuns) and not self.caps & CAP_RUNS:
                raise _Bad("CAP_RUNS was not granted")
            if isinstance(ev, Done) and not self.caps & CAP_DONE:
                raise _Bad("CAP_DONE was not granted")
            self._transition(self.our_role, ev)
        except _Bad as e:
            raise LocalProtocolError(f"{type(ev).__name__}: {e.why}") from None
        flags, parts = ev.encode()
        length = sum(len(p) for p in parts)
        hdr = HEADER.pack(ev.TYPE, flags, 0, length)
        self.bytes_sent += HEADER.size + length
        if len(parts[0]) < 256:
            return [hdr + parts[0], *parts[1:]]
        return [hdr, *parts]

    def send(self, ev) -> bytes:
        """The frame of ``ev`` as bytes."""
        return b"".join(bytes(p) if isinstance(p, memoryview) else p
                        for p in self.send_parts(ev))

    # -- state ---------------------------------------------------------------
    def _transition(self, sender: Role, ev) -> None:
        cls = type(ev)          # (events are final classes: type, not isinstance)
        nxt = TRANSITIONS.get((self.state, sender, (cls, ev.mode) if cls is Hello else cls))
        if nxt is None:
            raise _Bad(f"{cls.__name__} from the {sender.value} not allowed in state "
                       f"{self.state.value}")
        if cls is Get or cls is GetMap or cls is GetRuns:
            if len(self._gets) >= MAX_OUTSTANDING_GETS:
                raise _Bad(f"more than {MAX_OUTSTANDING_GETS} GETs outstanding")
            self._gets.append((ev.req_id, Get if cls is GetRuns else cls,
                               ev.nr_pages if cls is not GetMap else 0))
        elif cls is PageData or cls is PageMap:
            asked = Get if cls is PageData else GetMap
            if not self._gets or self._gets[0][:2] != (ev.req_id, asked):
                want = (f"{self._gets[0][1].__name__} {self._gets[0][0]}" if self._gets
                        else "none")
                raise _Bad(f"{cls.__name__} for req_id {ev.req_id}, outstanding: {want}")
            if cls is PageData and ev.nr_pages != self._gets[0][2]:
                raise _Bad(f"PageData of {ev.nr_pages} pages for req_id {ev.req_id}, which "
                           f"asked for {self._gets[0][2]}")
            if cls is PageData or ev.last:
                self._gets.popleft()
        elif cls is Hello:
            self.mode = ev.mode
        elif cls is Welcome:
            self.caps = ev.caps
        self.state = nxt
