"""Image files: header, length-prefixed protobuf records, raw page files.

Layout of every file (DESIGN.md §2)::

    0   magic "MGRT"        4 bytes
    4   format version      u16 LE
    6   kind (ImageKind)    u16 LE
    8   flags, reserved     2 x u32 (zero)
    16  records: u32 LE length, then that many bytes of protobuf, repeated

A pages file has the same 16-byte header padded with zeros to 4096 bytes, then
raw 4 KiB pages in pagemap order, page aligned (mmap or O_DIRECT friendly).
tcp-queues.img has the 16-byte header, then raw bytes (TCP queues, placed
by offsets in files.img).
Every file's size and xxh3-128 are listed in inventory.img, which is written
last: a directory without a valid inventory is not an image.
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
import re
import struct
import time

import xxhash
from google.protobuf.message import DecodeError

from migrate.errors import ImageError
from migrate.images import _pb
from migrate.images.pagemap import Entry

log = logging.getLogger(__name__)

MAGIC = b"MGRT"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHII")
RECLEN = struct.Struct("<I")
PAGE_SIZE = 4096
PAGES_DATA_OFFSET = PAGE_SIZE
MAX_RECORD = 64 << 20   # the largest single message we accept (an mm of ~500k VMAs)
MAX_RECORDS = 1 << 22

PE_PRESENT = 1
PE_IN_PARENT = 2
PE_LAZY = 4
PE_ZERO = 8


class ImageKind(enum.IntEnum):
    INVENTORY = 1
    PSTREE = 2
    CORE = 3
    MM = 4
    PAGEMAP = 5
    PAGES = 6
    FILES = 7
    FDINFO = 8
    FS = 9
    STATS = 10
    PIPES = 11
    QUEUES = 12


RAW_KINDS = (ImageKind.PAGES, ImageKind.QUEUES)     # bytes, not records

# kind -> (message class of the first record, of the following records)
_SCHEMA = {
    ImageKind.INVENTORY: (_pb.inventory_pb2.inventory_entry, None),
    ImageKind.PSTREE: (_pb.pstree_pb2.pstree_entry, _pb.pstree_pb2.pstree_entry),
    ImageKind.CORE: (_pb.core_pb2.task_core_entry, None),
    ImageKind.MM: (_pb.mm_pb2.mm_entry, None),
    ImageKind.PAGEMAP: (_pb.pagemap_pb2.pagemap_head, _pb.pagemap_pb2.pagemap_entries),
    ImageKind.FILES: (_pb.files_pb2.file_entry, _pb.files_pb2.file_entry),
    ImageKind.FDINFO: (_pb.files_pb2.fdinfo_entry, _pb.files_pb2.fdinfo_entry),
    ImageKind.FS: (_pb.files_pb2.fs_entry, None),
    ImageKind.STATS: (_pb.stats_pb2.stats_entry, None),
    ImageKind.PIPES: (_pb.files_pb2.pipe_data_entry, _pb.files_pb2.pipe_data_entry),
}

_NAMES = [
    (re.compile(r"inventory\.img"), ImageKind.INVENTORY),
    (re.compile(r"pstree\.img"), ImageKind.PSTREE),
    (re.compile(r"core-\d+\.img"), ImageKind.CORE),
    (re.compile(r"mm-\d+\.img"), ImageKind.MM),
    (re.compile(r"pagemap-\d+\.img"), ImageKind.PAGEMAP),
    (re.compile(r"pages-\d+\.img"), ImageKind.PAGES),
    (re.compile(r"files\.img"), ImageKind.FILES),
    (re.compile(r"fdinfo-\d+\.img"), ImageKind.FDINFO),
    (re.compile(r"fs-\d+\.img"), ImageKind.FS),
    (re.compile(r"stats-(dump|restore)\.img"), ImageKind.STATS),
    (re.compile(r"pipes\.img"), ImageKind.PIPES),
    (re.compile(r"tcp-queues\.img"), ImageKind.QUEUES),
]


def kind_of(name: str) -> ImageKind | None:
    base = os.path.basename(name)
    for rx, kind in _NAMES:
        if rx.fullmatch(base):
            return kind
    return None


def header(kind: ImageKind) -> bytes:
    return HEADER.pack(MAGIC, FORMAT_VERSION, int(kind), 0, 0)


def parse_header(data: bytes, path: str, expect: ImageKind | None = None) -> ImageKind:
    if len(data) < HEADER.size:
        raise ImageError(path, 0, f"truncated header: {len(data)} of {HEADER.size} bytes")
    magic, version, kind, _, _ = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageError(path, 0, f"bad magic {magic!r}, expected {MAGIC!r}: not a migrate image")
    if version != FORMAT_VERSION:
        raise ImageError(path, 4, f"format version {version}, this migrate reads "
                                  f"version {FORMAT_VERSION}")
    try:
        k = ImageKind(kind)
    except ValueError:
        raise ImageError(path, 6, f"unknown image kind {kind}") from None
    if expect is not None and k != expect:
        raise ImageError(path, 6, f"image kind {k.name}, expected {expect.name}")
    return k


PAGEMAP_BATCH = 16384     # entries per pagemap record (<= ~350 KB)


def _pack_pagemap(msgs) -> list:
    """[head, entry, ...] -> [head, pagemap_entries, ...]: the entries (pb
    messages or pagemap.Entry) packed by PAGEMAP_BATCH."""
    msgs = list(msgs)
    out = msgs[:1]
    rest = msgs[1:]
    for i in range(0, len(rest), PAGEMAP_BATCH):
        part = rest[i:i + PAGEMAP_BATCH]
        m = _pb.pagemap_pb2.pagemap_entries()
        m.vaddr.extend([e.vaddr for e in part])
        m.nr_pages.extend([e.nr_pages for e in part])
        m.flags.extend([e.flags for e in part])
        out.append(m)
    return out


def _unpack_pagemap(path: str, records: list) -> list:
    """[head, pagemap_entries, ...] -> [head, pagemap.Entry, ...]."""
    out = records[:1]
    for i, m in enumerate(records[1:], 1):
        v, n, f = list(m.vaddr), list(m.nr_pages), list(m.flags)
        if not len(v) == len(n) == len(f):
            if max(len(v), len(n), len(f)) > 1:
                raise ImageError(path, None, f"pagemap record {i}: {len(v)} addresses, "
                                             f"{len(n)} sizes and {len(f)} flags")
            # one pagemap_entry: proto3 left its zero fields out
            v, n, f = v or [0], n or [0], f or [0]
        out.extend(map(Entry._make, zip(v, n, f)))
        if len(out) > MAX_RECORDS:
            raise ImageError(path, None, f"more than {MAX_RECORDS} pagemap entries")
    return out


def encode_parts(kind: ImageKind, msgs) -> tuple[list[bytes], int]:
    """The file as a list of pieces (header, then length and record for
    each message) and its size: written with writev, never joined (a
    files.img of TCP queues is megabytes: a join is a copy into fresh
    memory, a page fault every 4 KiB)."""
    parts = [header(kind)]
    size = HEADER.size
    if kind == ImageKind.PAGEMAP:
        msgs = _pack_pagemap(msgs)
    for m in msgs:
        b = m.SerializeToString()
        if len(b) > MAX_RECORD:
            raise ValueError(f"{kind.name} record of {len(b)} bytes exceeds {MAX_RECORD}")
        parts.append(RECLEN.pack(len(b)))
        parts.append(b)
        size += RECLEN.size + len(b)
    return parts, size


def encode_records(kind: ImageKind, msgs) -> bytes:
    return b"".join(encode_parts(kind, msgs)[0])


def decode_records(data: bytes, path: str, expect: ImageKind | None = None):
    """Parse a records file; every length is checked before it is used."""
    kind = parse_header(data, path, expect)
    if kind == ImageKind.PAGES:
        raise ImageError(path, 0, "a pages file holds raw pages, not records")
    if kind == ImageKind.QUEUES:
        raise ImageError(path, 0, "tcp-queues.img holds raw bytes, not records")
    first_cls, rest_cls = _SCHEMA[kind]
    with memoryview(data) as view:    # records parsed from slices of it, not copies
        return kind, _decode(view, path, kind, first_cls, rest_cls)


def _decode(data: memoryview, path: str, kind: ImageKind, first_cls, rest_cls) -> list:
    out = []
    off = HEADER.size
    while off < len(data):
        if len(out) >= MAX_RECORDS:
            raise ImageError(path, off, f"more than {MAX_RECORDS} records")
        if len(data) - off < RECLEN.size:
            raise ImageError(path, off, f"truncated record length: {len(data) - off} "
                                        f"of {RECLEN.size} bytes")
        (n,) = RECLEN.unpack_from(data, off)
        if n > MAX_RECORD:
            raise ImageError(path, off, f"record length {n} exceeds the limit {MAX_RECORD}")
        if n > len(data) - off - RECLEN.size:
            raise ImageError(path, off, f"truncated record: length {n} but only "
                                        f"{len(data) - off - RECLEN.size} bytes follow")
        cls = first_cls if not out else rest_cls
        if cls is None:
            raise ImageError(path, off, f"{kind.name} image holds one record, found more")
        msg = cls()
        try:
            msg.ParseFromString(data[off + RECLEN.size: off + RECLEN.size + n])
        except DecodeError as e:
            raise ImageError(path, off, f"malformed {cls.DESCRIPTOR.name} record: {e}") from None
        out.append(msg)
        off += RECLEN.size + n
    if not out and kind not in (ImageKind.FILES, ImageKind.FDINFO, ImageKind.PIPES):
        raise ImageError(path, HEADER.size, f"{kind.name} image holds no record")
    if kind == ImageKind.PAGEMAP:
        out = _unpack_pagemap(path, out)
    return out


def _hexdigest(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


CHUNK_PAGES = 2048      # 8 MiB: the unit of the page file's checksum and of copying


def pages_digest(header_digest: bytes, chunk_digests: list[bytes]) -> str:
    """The checksum of a page file, as listed in the inventory: xxh3-128 over
    the digest of its header page followed by the digest of every 8 MiB chunk
    of page data, in order.  Chunks hash independently, so they can be
    written and checked on several cores."""
    h = xxhash.xxh3_128(header_digest)
    for d in chunk_digests:
        h.update(d)
    return h.hexdigest()


def chunk_digest(data) -> bytes:
    return xxhash.xxh3_128_digest(data)


def chunk_hasher():
    """Streaming form of chunk_digest: update() piece by piece, then digest()."""
    return xxhash.xxh3_128()


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
MAP_OVER = 1 << 20      # records images from this size on are mapped to be read


def _sync_close(fd: int, path: str) -> None:
    """fsync, then close whatever happened (a written image file's end)."""
    try:
        os.fsync(fd)
    except OSError as e:
        raise ImageError(path, None, f"fsync failed: {os.strerror(e.errno)}") from e
    finally:
        os.close(fd)


class PagesWriter:
    """Writes pages-PID.img chunk by chunk; chunks may be written from several
    threads (pwrite at their offset), and are accounted in order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        head = header(ImageKind.PAGES).ljust(PAGES_DATA_OFFSET, b"\0")
        self._pwrite(head, 0)
        self.header_digest = chunk_digest(head)
        self.digests: list[bytes] = []
        self.nr_pages = 0

    def _pwrite(self, view, off: int) -> None:
        view = memoryview(view)
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], off + done)
            except OSError as e:
                raise ImageError(self.path, off + done,
                                 f"write failed: {os.strerror(e.errno)}") from e

    @property
    def size(self) -> int:
        return PAGES_DATA_OFFSET + self.nr_pages * PAGE_SIZE

    def write_at(self, page_index: int, view) -> None:
        """pwrite whole pages at page ``page_index`` of the data area; thread-safe.
        The caller hashes each chunk (``chunk_hasher``) and accounts it in order."""
        if len(view) % PAGE_SIZE:
            raise ValueError(f"{len(view)} bytes are not whole pages")
        self._pwrite(view, PAGES_DATA_OFFSET + page_index * PAGE_SIZE)

    def write_chunk(self, index: int, view) -> bytes:
        """Write chunk ``index`` (at most CHUNK_PAGES pages); return its digest.
        Thread-safe; call ``account`` with the digests in chunk order."""
        if len(view) % PAGE_SIZE or len(view) > CHUNK_PAGES * PAGE_SIZE:
            raise ValueError(f"chunk of {len(view)} bytes")
        self._pwrite(view, PAGES_DATA_OFFSET + index * CHUNK_PAGES * PAGE_SIZE)
        return chunk_digest(view)

    def account(self, nr_pages: int, digest: bytes) -> None:
        self.nr_pages += nr_pages
        self.digests.append(digest)

    def close(self) -> tuple[int, str]:
        _sync_close(self.fd, self.path)
        return self.size, pages_digest(self.header_digest, self.digests)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class RawWriter:
    """Writes a raw image file (tcp-queues.img): its header, then bytes
    appended in order, hashed as they go."""

    def __init__(self, path: str, kind: ImageKind) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.hasher = xxhash.xxh3_128()
        self.size = 0           # bytes after the header
        self._write(header(kind))
        self.size = 0

    def _write(self, view) -> None:
        try:
            _writev_all(self.fd, [view])
        except OSError as e:
            raise ImageError(self.path, HEADER.size + self.size,
                             f"write failed: {os.strerror(e.errno)}") from e
        self.hasher.update(view)
        self.size += len(view)

    def append(self, view) -> int:
        """Write ``view`` (any buffer: written before this returns) at the
        end; return its offset past the header."""
        off = self.size
        if len(view):
            self._write(view)
        return off

    def close(self) -> tuple[int, str]:
        fd, self.fd = self.fd, -1
        _sync_close(fd, self.path)
        return HEADER.size + self.size, self.hasher.hexdigest()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PagesReader:
    """Reads pages-PID.img chunk by chunk (from several threads if wanted) and
    checks its checksum once every chunk was accounted in order."""

    def __init__(self, path: str, size: int | None, digest: str | None) -> None:
        self.path = path
        self.expect_size = size
        self.expect_digest = digest
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageError(path, None, "missing") from None
        st = os.fstat(self.fd)
        if size is not None and st.st_size != size:
            os.close(self.fd)
            raise ImageError(path, min(st.st_size, size),
                             f"size {st.st_size}, the inventory says {size} (truncated or grown)")
        head = os.pread(self.fd, PAGES_DATA_OFFSET, 0)
        try:
            parse_header(head, path, ImageKind.PAGES)
            if len(head) < PAGES_DATA_OFFSET:
                raise ImageError(path, len(head), "truncated before the first page")
            if (st.st_size - PAGES_DATA_OFFSET) % PAGE_SIZE:
                raise ImageError(path, st.st_size, "size is not a whole number of pages")
        except ImageError:
            os.close(self.fd)
            raise
        self.header_digest = chunk_digest(head)
        self.digests: list[bytes] = []
        self.nr_pages = (st.st_size - PAGES_DATA_OFFSET) // PAGE_SIZE
        self.accounted = 0

    def read_chunk(self, index: int, view) -> bytes:
        """Fill ``view`` with chunk ``index`` (or its first len(view) bytes);
        return the chunk's digest.  Thread-safe."""
        off = PAGES_DATA_OFFSET + index * CHUNK_PAGES * PAGE_SIZE
        got = 0
        while got < len(view):
            n = os.preadv(self.fd, [view[got:]], off + got)
            if n <= 0:
                raise ImageError(self.path, off + got, f"truncated: wanted {len(view) - got} "
                                                       "more bytes of pages")
            got += n
        return chunk_digest(view)

    def map_chunk(self, index: int, nr_pages: int) -> mmap.mmap:
        """Chunk ``index`` mapped read-only and populated: no copy out of the
        page cache.  Thread-safe; the caller closes it and hashes it with
        ``chunk_digest``."""
        off = PAGES_DATA_OFFSET + index * CHUNK_PAGES * PAGE_SIZE
        if off + nr_pages * PAGE_SIZE > PAGES_DATA_OFFSET + self.nr_pages * PAGE_SIZE:
            raise ImageError(self.path, off, f"truncated: chunk {index} of {nr_pages} pages "
                                             f"is past the end ({self.nr_pages} pages)")
        try:
            return mmap.mmap(self.fd, nr_pages * PAGE_SIZE, mmap.MAP_SHARED | _POPULATE,
                             mmap.PROT_READ, offset=off)
        except OSError as e:
            raise ImageError(self.path, off, f"mmap failed: {os.strerror(e.errno)}") from e

    def account(self, nr_pages: int, digest: bytes) -> None:
        self.accounted += nr_pages
        self.digests.append(digest)

    def offset_of(self, index: int, nr_pages: int) -> int:
        """File offset of pages [index, index + nr_pages), for a direct
        read (the restore's premap); unchecked until ``verify``."""
        if index < 0 or nr_pages < 0 or index + nr_pages > self.nr_pages:
            raise ImageError(self.path, None, f"pages {index}..{index + nr_pages} needed, "
                                              f"the file holds {self.nr_pages}")
        return PAGES_DATA_OFFSET + index * PAGE_SIZE

    def verify(self) -> None:
        """Compare with the inventory; chunks not read yet are read here."""
        if self.expect_digest is None:
            return
        buf = bytearray(CHUNK_PAGES * PAGE_SIZE)
        while self.accounted < self.nr_pages:
            n = min(CHUNK_PAGES, self.nr_pages - self.accounted)
            if self.accounted % CHUNK_PAGES:
                raise ImageError(self.path, None, "partial chunk accounted")
            view = memoryview(buf)[:n * PAGE_SIZE]
            self.account(n, self.read_chunk(self.accounted // CHUNK_PAGES, view))
        got = pages_digest(self.header_digest, self.digests)
        if got != self.expect_digest:
            raise ImageError(self.path, None, f"checksum mismatch: xxh3-128 {got}, "
                                              f"the inventory says {self.expect_digest}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def fsync_dir(path: str) -> None:
    """Make the directory entries of ``path`` durable (the inventory's above all)."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


IOV_MAX = 1024      # man 2 writev


def _writev_all(fd: int, parts) -> None:
    """Write every piece, in order, IOV_MAX pieces per writev, short
    writes resumed."""
    views = [memoryview(p) for p in parts if len(p)]
    i = 0
    while i < len(views):
        batch = views[i:i + IOV_MAX]
        n = os.writev(fd, batch)
        for v in batch:             # skip what was written
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                views[i] = v[n:]
                break


# Decoded records images by (real path, size, checksum), once enabled: a
# process that reads the same images again (a migration's destination
# reads the pre-copy rounds' pagemaps as they arrive, and again at the
# restore) decodes and checks each file once.
_cache: dict | None = None


def enable_cache() -> None:
    global _cache
    if _cache is None:
        _cache = {}


class ImageDir:
    """An image directory: write files, then commit the inventory last.

    Its write side is the *image sink* the dump pipeline writes to:
    ``write_image(name, msgs)``, ``pages_writer(pid)`` (an object with
    ``write_chunk(index, view) -> digest`` callable from several threads,
    ``account(nr_pages, digest)`` in chunk order, ``close() -> (size, digest)``
    and ``abort()``), ``add_pages(pid, writer)``, ``raw_writer(name)`` (an
    object with ``append(view) -> offset``, the view written or copied before
    it returns, and ``abort()``) and ``add_raw(name, writer)`` for
    tcp-queues.img, ``set_parent(rel)`` (the ``parent`` symlink of an
    incremental image), ``commit(inventory)`` and ``discard()``.  Another
    sink (the page-server client) streams the same calls to a remote
    directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.checksums: dict[str, tuple[int, str]] = {}
        self.inventory = None
        self._open_pages: list[str] = []
        # False: records files, the inventory and the directory are not
        # fsynced (a page-server client's mirror, read only by this host).
        self.durable = True

    # -- writing ---------------------------------------------------------
    @classmethod
    def create(cls, path: str) -> "ImageDir":
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise ImageError(path, None, f"cannot create image directory: "
                                         f"{os.strerror(e.errno)}") from e
        if not os.access(path, os.W_OK | os.X_OK):
            raise ImageError(path, None, "image directory is not writable")
        inv = os.path.join(path, "inventory.img")
        if os.path.exists(inv):
            os.unlink(inv)  # an old image is incomplete until we commit again
        return cls(path)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def write_image(self, name: str, msgs) -> None:
        kind = kind_of(name)
        if kind is None or kind in RAW_KINDS or kind == ImageKind.INVENTORY:
            raise ValueError(f"{name}: not a records image name")
        parts, size = encode_parts(kind, msgs)
        h = xxhash.xxh3_128()
        for p in parts:
            h.update(p)
        self.checksums[name] = (size, h.hexdigest())
        self._write_file(name, parts)

    def _write_file(self, name: str, data) -> None:
        """Write ``data`` (bytes, or a list of pieces written in order)."""
        path = self._file(name)
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _writev_all(fd, parts)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise ImageError(path, None, f"write failed: {os.strerror(e.errno)}") from e

    def pages_writer(self, pid: int) -> PagesWriter:
        path = self._file(f"pages-{pid}.img")
        self._open_pages.append(f"pages-{pid}.img")
        try:
            return PagesWriter(path)
        except OSError as e:
            raise ImageError(path, None, f"cannot create: {os.strerror(e.errno)}") from e

    def add_pages(self, pid: int, writer: PagesWriter) -> None:
        self.checksums[f"pages-{pid}.img"] = writer.close()

    def raw_writer(self, name: str) -> RawWriter:
        """A raw image (tcp-queues.img) written as it goes; ``add_raw`` it
        once complete (``abort`` it otherwise)."""
        kind = kind_of(name)
        if kind != ImageKind.QUEUES:
            raise ValueError(f"{name}: not a raw image name")
        path = self._file(name)
        self._open_pages.append(name)
        try:
            return RawWriter(path, kind)
        except OSError as e:
            raise ImageError(path, None, f"cannot create: {os.strerror(e.errno)}") from e

    def add_raw(self, name: str, writer: RawWriter) -> None:
        self.checksums[name] = writer.close()

    def set_parent(self, rel: str) -> None:
        """Point ``parent`` at the previous image of a pre-dump chain."""
        link = self._file("parent")
        try:
            if os.path.islink(link) or os.path.exists(link):
                os.unlink(link)
            os.symlink(rel, link)
        except OSError as e:
            raise ImageError(link, None, f"cannot link parent {rel}: "
                                         f"{os.strerror(e.errno)}") from e

    def discard(self) -> None:
        """Remove every file this sink wrote (a dump that failed)."""
        for name in list(self.checksums) + ["inventory.img"] + self._open_pages:
            try:
                os.unlink(self._file(name))
            except OSError:
                pass
        self.checksums.clear()

    def commit(self, inv) -> None:
        """Write inventory.img with every file's checksum, then sync the dir."""
        del inv.files[:]
        for name in sorted(self.checksums):
            size, digest = self.checksums[name]
            inv.files.add(name=name, size=size, xxh3_128=digest)
        inv.format_version = FORMAT_VERSION
        if not inv.created_ns:
            inv.created_ns = time.time_ns()
        self._write_file("inventory.img", encode_records(ImageKind.INVENTORY, [inv]))
        if self.durable:
            try:
                fsync_dir(self.path)
            except OSError as e:
                log.warning("%s: fsync of the directory failed: %s", self.path,
                            os.strerror(e.errno))
        self.inventory = inv

    # -- reading ---------------------------------------------------------
    @classmethod
    def open(cls, path: str) -> "ImageDir":
        if not os.path.isdir(path):
            raise ImageError(path, None, "no such image directory")
        d = cls(path)
        inv_path = d._file("inventory.img")
        try:
            with open(inv_path, "rb") as f:
                data = f.read(MAX_RECORD + HEADER.size + RECLEN.size + 1)
        except FileNotFoundError:
            raise ImageError(inv_path, None, "missing: the image is incomplete "
                                             "(a dump that did not finish?)") from None
        _, (inv,) = decode_records(data, inv_path, ImageKind.INVENTORY)
        d.inventory = inv
        for f in inv.files:
            d.checksums[f.name] = (f.size, f.xxh3_128)
        return d

    def has(self, name: str) -> bool:
        return name in self.checksums

    def read_image(self, name: str):
        path = self._file(name)
        if name not in self.checksums:
            raise ImageError(path, None, "not listed in inventory.img")
        size, digest = self.checksums[name]
        if _cache is not None:
            key = (os.path.realpath(path), size, digest)
            hit = _cache.get(key)
            if hit is None:
                hit = _cache[key] = self._read_image(path, name, size, digest)
            return hit
        return self._read_image(path, name, size, digest)

    @staticmethod
    def _read_image(path: str, name: str, size: int, digest: str):
        # Mapped from MAP_OVER bytes on: the records are parsed straight
        # from the page cache.
        data = ImageDir._load(path, size)
        try:
            got = _hexdigest(data)
            if got != digest:
                # Find the first bad record for a useful offset, else report the file.
                decode_records(data, path, kind_of(name))
                raise ImageError(path, None, f"checksum mismatch: xxh3-128 {got}, "
                                             f"the inventory says {digest}")
            return decode_records(data, path, kind_of(name))[1]
        finally:
            if isinstance(data, mmap.mmap):
                data.close()

    def read_one(self, name: str):
        return self.read_image(name)[0]

    def read_raw(self, name: str) -> memoryview:
        """The bytes of a raw image past its header, size and checksum
        checked; a view of the file mapped (1 MiB or more) or read.  The
        mapping goes when the last view of it does."""
        path = self._file(name)
        if name not in self.checksums:
            raise ImageError(path, None, "not listed in inventory.img")
        size, digest = self.checksums[name]
        data = self._load(path, size)
        if _hexdigest(data) != digest:
            raise ImageError(path, None, f"checksum mismatch: xxh3-128 {_hexdigest(data)}, "
                                         f"the inventory says {digest}")
        parse_header(data[:HEADER.size], path, kind_of(name))
        return memoryview(data)[HEADER.size:]

    @staticmethod
    def _load(path: str, size: int):
        """The file's bytes, ``size`` of them or an ImageError: mapped from
        MAP_OVER bytes on (no copy into fresh memory), read below."""
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise ImageError(path, None, "missing (listed in inventory.img)") from None
        with f:
            real = os.fstat(f.fileno()).st_size
            if real != size:
                raise ImageError(path, min(real, size),
                                 f"size {real if real <= size else 'over ' + str(size)}, "
                                 f"the inventory says {size} (truncated or grown)")
            if size < MAP_OVER:
                data = f.read(size)
            else:
                data = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED | _POPULATE,
                                 mmap.PROT_READ)
        if len(data) != size:
            raise ImageError(path, len(data), f"size {len(data)} while read, the "
                                              f"inventory says {size} (truncated)")
        return data

    def pages_reader(self, pid: int) -> PagesReader:
        name = f"pages-{pid}.img"
        size, digest = self.checksums.get(name, (None, None))
        if size is None:
            raise ImageError(self._file(name), None, "not listed in inventory.img")
        return PagesReader(self._file(name), size, digest)

    def verify_all(self) -> None:
        """Check every listed file (used by `migrate show --verify`)."""
        for name in self.checksums:
            if kind_of(name) == ImageKind.PAGES:
                r = self.pages_reader(int(name[6:-4]))
                try:
                    r.verify()
                finally:
                    r.close()
            elif kind_of(name) == ImageKind.QUEUES:
                self.read_raw(name).release()
            else:
                self.read_image(name)


def decode_file(path: str, max_pages: int = 0) -> dict:
    """Any image file as a JSON-ready dict (`migrate show`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(PAGES_DATA_OFFSET)
            kind = parse_header(head, path)
            if kind == ImageKind.PAGES:
                size = os.fstat(f.fileno()).st_size
                return {"magic": "PAGES", "file": os.path.basename(path),
                        "nr_pages": (size - PAGES_DATA_OFFSET) // PAGE_SIZE}
            if kind == ImageKind.QUEUES:
                return {"magic": "QUEUES", "file": os.path.basename(path),
                        "bytes": os.fstat(f.fileno()).st_size - HEADER.size}
            f.seek(0)
            data = f.read()
    except FileNotFoundError:
        raise ImageError(path, None, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, None, "is a directory") from None
    kind, msgs = decode_records(data, path)
    from google.protobuf import json_format     # `migrate show` only: a slow import
    # pagemap entries (read packed): the fields of pagemap_entry
    entries = [m._asdict() if isinstance(m, Entry) else
               json_format.MessageToDict(m, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=False)
               for m in msgs]
    return {"magic": kind.name, "file": os.path.basename(path), "entries": entries}
