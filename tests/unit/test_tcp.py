"""/proc/net/tcp parsing and the network lock's connection names, on canned text."""

import socket

from migrate.kernel import tcprepair
from migrate.resources import netlock

TCP4 = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 636 1 000000002f177a0c 100 0 0 10 0
   1: 0100E70A:B806 0200E70A:1B58 01 00000010:00000020 02:00000014 00000000     0        0 4242 2 0000000063a72834 20 4 30 10 -1
"""
TCP6 = """  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000200E70A:1B58 0000000000000000FFFF00000100E70A:C9C2 01 00000000:00000000 00:00000000 00000000     0        0 77 1 0 20 4 30 10 -1
"""


def test_parse_tcp4():
    socks = tcprepair.parse_inet(TCP4, socket.AF_INET)
    assert socks[0].local == ("0.0.0.0", 2024) and socks[0].state == tcprepair.TCP_LISTEN
    assert socks[0].rx_queue == 3
    est = socks[1]
    assert est.local == ("10.231.0.1", 47110) and est.remote == ("10.231.0.2", 7000)
    assert est.state == tcprepair.TCP_ESTABLISHED and est.inode == 4242
    assert est.tx_queue == 16 and est.rx_queue == 32
    assert est.describe() == "10.231.0.1:47110 -> 10.231.0.2:7000 (ESTABLISHED)"


def test_parse_tcp6_mapped():
    s = tcprepair.parse_inet(TCP6, socket.AF_INET6)[0]
    assert s.local == ("::ffff:10.231.0.2", 7000) and s.remote == ("::ffff:10.231.0.1", 51650)
    # an IPv4 connection on an IPv6 socket is locked as IPv4
    c = netlock.Conn.of(s.family, *s.local, *s.remote)
    assert c == netlock.Conn(socket.AF_INET, "10.231.0.2", 7000, "10.231.0.1", 51650)
    assert str(c) == "10.231.0.2:7000 -> 10.231.0.1:51650"


def test_conn_v6_kept():
    c = netlock.Conn.of(socket.AF_INET6, "fd00::1", 1, "fd00::2", 2)
    assert c.family == socket.AF_INET6 and str(c) == "[fd00::1]:1 -> [fd00::2]:2"


def test_lock_names():
    assert netlock.NetLock(42, "nftables").name == "migrate-42"
    assert netlock.NetLock(42, "iptables").name == "MIGRATE-42"


def test_queue_views_from_tcp_queues_img():
    """Each connection's queues where its entry says, bounds checked."""
    import pytest
    from migrate import errors
    from migrate.images._pb import files_pb2
    from migrate.resources import tcp
    raw = memoryview(b"AAAABBBccDDDDDD")
    e = files_pb2.tcp_stream_entry(queues_off=7, inq_len=2, outq_len=6)
    inq, outq = tcp.queue_views(e, raw, "TCP a -> b")
    assert (bytes(inq), bytes(outq)) == (b"cc", b"DDDDDD")
    e.outq_len = 7
    with pytest.raises(errors.RestoreError, match=r"\[0x7, 0x10\) of tcp-queues.img"):
        tcp.queue_views(e, raw, "TCP a -> b")
    with pytest.raises(errors.RestoreError, match="does not list"):
        tcp.queue_views(e, None, "TCP a -> b")
    old = files_pb2.tcp_stream_entry(inq=b"in", outq=b"out")   # queues in the entry
    assert tcp.queue_views(old, None, "TCP a -> b") == (b"in", b"out")
