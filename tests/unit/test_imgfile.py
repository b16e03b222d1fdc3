"""The image format: round trips, and every malformed file refused with its
name and offset (ImageError only, never another exception)."""

import os

import pytest
from hypothesis import given, settings, strategies as st

from migrate.errors import ImageError
from migrate.images import ImageDir, ImageKind, decode_file, imgfile
from migrate.images import pagemap as pm
from migrate.images._pb import inventory_pb2, pagemap_pb2, pstree_pb2


def _make(tmp_path, pages=b"x" * 8192):
    d = ImageDir.create(str(tmp_path))
    d.write_image("pstree.img", [pstree_pb2.pstree_entry(pid=42, pgid=42, sid=42, threads=[42])])
    d.write_image("pagemap-42.img", [pagemap_pb2.pagemap_head(pid=42, nr_pages=2),
                                     pagemap_pb2.pagemap_entry(vaddr=0x1000, nr_pages=2,
                                                               flags=1)])
    w = d.pages_writer(42)
    w.account(len(pages) // 4096, w.write_chunk(0, pages))
    d.add_pages(42, w)
    d.commit(inventory_pb2.inventory_entry(root_pid=42))
    return str(tmp_path)


def test_round_trip(tmp_path):
    path = _make(tmp_path)
    d = ImageDir.open(path)
    assert d.inventory.root_pid == 42
    assert d.read_one("pstree.img").threads == [42]
    head, ent = d.read_image("pagemap-42.img")
    assert head.nr_pages == 2 and ent.vaddr == 0x1000
    r = d.pages_reader(42)
    buf = bytearray(8192)
    r.account(2, r.read_chunk(0, memoryview(buf)))
    r.verify()
    assert bytes(buf) == b"x" * 8192
    assert os.path.getsize(os.path.join(path, "pages-42.img")) % 4096 == 0


def test_missing_inventory_is_incomplete(tmp_path):
    path = _make(tmp_path)
    os.unlink(os.path.join(path, "inventory.img"))
    with pytest.raises(ImageError, match="incomplete"):
        ImageDir.open(path)


def test_truncated_file_names_file_and_offset(tmp_path):
    path = _make(tmp_path)
    f = os.path.join(path, "pagemap-42.img")
    data = open(f, "rb").read()
    open(f, "wb").write(data[:-3])
    with pytest.raises(ImageError) as e:
        ImageDir.open(path).read_image("pagemap-42.img")
    assert "pagemap-42.img" in str(e.value) and e.value.offset is not None


def test_corrupt_byte_is_a_checksum_mismatch(tmp_path):
    path = _make(tmp_path)
    f = os.path.join(path, "pstree.img")
    data = bytearray(open(f, "rb").read())
    data[-1] ^= 0x01
    open(f, "wb").write(bytes(data))
    with pytest.raises(ImageError, match="pstree.img"):
        ImageDir.open(path).read_image("pstree.img")


def test_corrupt_page_detected_at_verify(tmp_path):
    path = _make(tmp_path)
    f = os.path.join(path, "pages-42.img")
    with open(f, "r+b") as fh:
        fh.seek(4096 + 100)
        fh.write(b"y")
    r = ImageDir.open(path).pages_reader(42)
    with pytest.raises(ImageError, match="checksum mismatch"):
        r.verify()     # reads every chunk not yet read


def test_wrong_version_and_magic(tmp_path):
    path = _make(tmp_path)
    f = os.path.join(path, "inventory.img")
    data = bytearray(open(f, "rb").read())
    data[4] = 99
    open(f, "wb").write(bytes(data))
    with pytest.raises(ImageError, match="format version 99"):
        ImageDir.open(path)
    data[0:4] = b"CRIU"
    open(f, "wb").write(bytes(data))
    with pytest.raises(ImageError, match="bad magic"):
        ImageDir.open(path)


def test_oversized_record_length_refused_before_allocation():
    data = imgfile.header(ImageKind.PSTREE) + (2**31).to_bytes(4, "little")
    with pytest.raises(ImageError, match="exceeds the limit"):
        imgfile.decode_records(data, "pstree.img")


def test_decode_file_for_show(tmp_path):
    path = _make(tmp_path)
    out = decode_file(os.path.join(path, "pstree.img"))
    assert out["magic"] == "PSTREE" and out["entries"][0]["pid"] == 42
    assert decode_file(os.path.join(path, "pages-42.img"))["nr_pages"] == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_image_error(blob):
    for kind in (ImageKind.PSTREE, ImageKind.CORE, ImageKind.PAGEMAP, ImageKind.MM):
        try:
            imgfile.decode_records(imgfile.header(kind) + blob, "x.img")
        except ImageError:
            pass
        try:
            imgfile.decode_records(blob, "x.img")
        except ImageError:
            pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**47), st.integers(1, 2**20)), max_size=50))
def test_pagemap_round_trip(entries):
    msgs = [pagemap_pb2.pagemap_head(pid=1, nr_pages=len(entries))] + [
        pagemap_pb2.pagemap_entry(vaddr=a, nr_pages=n, flags=1) for a, n in entries]
    data = imgfile.encode_records(ImageKind.PAGEMAP, msgs)
    kind, out = imgfile.decode_records(data, "pagemap-1.img")
    assert kind == ImageKind.PAGEMAP and out[0] == msgs[0]
    assert [tuple(e) for e in out[1:]] == [(a, n, 1) for a, n in entries]


def test_pagemap_entries_packed_in_batches():
    n = imgfile.PAGEMAP_BATCH * 2 + 3
    ents = [pm.Entry(i * 8192, 1, 1 + i % 2) for i in range(n)]
    data = imgfile.encode_records(ImageKind.PAGEMAP,
                                  [pagemap_pb2.pagemap_head(pid=1, nr_pages=n), *ents])
    _, out = imgfile.decode_records(data, "pagemap-1.img")
    assert out[1:] == ents
    # three records after the head, not one per entry
    assert len(data) < n * 8


def test_pagemap_one_entry_records_still_read():
    # Images written before the packed records: one pagemap_entry per
    # record, proto3 leaving zero fields out (vaddr 0, flags 0).
    old = [pagemap_pb2.pagemap_entry(vaddr=0, nr_pages=2, flags=1),
           pagemap_pb2.pagemap_entry(vaddr=0x5000, nr_pages=1, flags=0)]
    parts = [imgfile.header(ImageKind.PAGEMAP)]
    for m in [pagemap_pb2.pagemap_head(pid=1, nr_pages=2), *old]:
        b = m.SerializeToString()
        parts += [imgfile.RECLEN.pack(len(b)), b]
    _, out = imgfile.decode_records(b"".join(parts), "pagemap-1.img")
    assert out[1:] == [(0, 2, 1), (0x5000, 1, 0)]


def test_pagemap_record_arrays_of_different_lengths_refused():
    m = pagemap_pb2.pagemap_entries(vaddr=[0, 4096], nr_pages=[1], flags=[1, 1])
    parts = [imgfile.header(ImageKind.PAGEMAP)]
    for r in (pagemap_pb2.pagemap_head(pid=1, nr_pages=2), m):
        b = r.SerializeToString()
        parts += [imgfile.RECLEN.pack(len(b)), b]
    with pytest.raises(ImageError, match="2 addresses, 1 sizes and 2 flags"):
        imgfile.decode_records(b"".join(parts), "pagemap-1.img")


def _big_files(tmp_path):
    """A files.img over MAP_OVER (mapped to be read): TCP queues."""
    from migrate.images._pb import files_pb2
    d = ImageDir.create(str(tmp_path))
    queues = [bytes([i]) * 65536 for i in range(24)]
    fs = []
    for i, q in enumerate(queues):
        f = files_pb2.file_entry(id=i + 1, type=files_pb2.INET_SOCKET)
        f.inet.tcp.inq = q
        fs.append(f)
    d.write_image("files.img", fs)
    d.commit(inventory_pb2.inventory_entry(root_pid=42))
    assert os.path.getsize(os.path.join(str(tmp_path), "files.img")) > imgfile.MAP_OVER
    return str(tmp_path), queues


def test_big_records_image_round_trip(tmp_path):
    path, queues = _big_files(tmp_path)
    d = ImageDir.open(path)
    assert [f.inet.tcp.inq for f in d.read_image("files.img")] == queues
    with open(os.path.join(path, "files.img"), "rb") as f:
        data = f.read()
    assert d.checksums["files.img"] == (len(data), imgfile._hexdigest(data))


def test_big_records_image_corrupt_byte(tmp_path):
    path, _ = _big_files(tmp_path)
    name = os.path.join(path, "files.img")
    with open(name, "r+b") as f:
        f.seek(imgfile.MAP_OVER)
        b = f.read(1)
        f.seek(imgfile.MAP_OVER)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ImageError, match="checksum mismatch"):
        ImageDir.open(path).read_image("files.img")


def test_writev_all_resumes_short_writes(monkeypatch):
    """Every piece written once, in order, whatever writev takes each time."""
    got = bytearray()

    def short(fd, views):
        take = min(sum(len(v) for v in views), 7)   # 7 bytes a call at most
        out = 0
        for v in views:
            n = min(len(v), take - out)
            got.extend(bytes(v[:n]))
            out += n
            if out == take:
                break
        return out
    monkeypatch.setattr(imgfile.os, "writev", short)
    parts = [b"head", b"", b"0123456789", b"x" * 30, b"tail"]
    imgfile._writev_all(3, parts)
    assert bytes(got) == b"".join(parts)


@pytest.mark.parametrize("sizes", [[5, 0, 70000], [65536] * 20])    # read; mapped
def test_raw_queues_round_trip(tmp_path, sizes):
    d = ImageDir.create(str(tmp_path))
    w = d.raw_writer("tcp-queues.img")
    chunks = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    offs = [w.append(memoryview(c)) for c in chunks]
    d.add_raw("tcp-queues.img", w)
    d.commit(inventory_pb2.inventory_entry(root_pid=42))
    r = ImageDir.open(str(tmp_path))
    view = r.read_raw("tcp-queues.img")
    assert [bytes(view[o:o + len(c)]) for o, c in zip(offs, chunks)] == chunks
    assert len(view) == sum(sizes)
    r.verify_all()
    assert decode_file(os.path.join(str(tmp_path), "tcp-queues.img")) == \
        {"magic": "QUEUES", "file": "tcp-queues.img", "bytes": sum(sizes)}


def test_raw_queues_corrupt_or_truncated(tmp_path):
    d = ImageDir.create(str(tmp_path))
    w = d.raw_writer("tcp-queues.img")
    w.append(b"q" * 1000)
    d.add_raw("tcp-queues.img", w)
    d.commit(inventory_pb2.inventory_entry(root_pid=42))
    name = os.path.join(str(tmp_path), "tcp-queues.img")
    with open(name, "r+b") as f:
        f.seek(500)
        f.write(b"Q")
    with pytest.raises(ImageError, match="checksum mismatch"):
        ImageDir.open(str(tmp_path)).read_raw("tcp-queues.img")
    os.truncate(name, 600)
    with pytest.raises(ImageError, match="truncated"):
        ImageDir.open(str(tmp_path)).read_raw("tcp-queues.img")
    with pytest.raises(ImageError, match="raw bytes, not records"):
        imgfile.decode_records(open(name, "rb").read(), name)


def test_raw_queues_discarded_and_not_records(tmp_path):
    d = ImageDir.create(str(tmp_path))
    with pytest.raises(ValueError):
        d.write_image("tcp-queues.img", [])
    with pytest.raises(ValueError):
        d.raw_writer("files.img")
    w = d.raw_writer("tcp-queues.img")
    w.append(b"x")
    w.abort()
    d.discard()
    assert not os.path.exists(os.path.join(str(tmp_path), "tcp-queues.img"))
