"""Established TCP connections, by TCP_REPAIR (man 7 tcp, include/uapi/linux/tcp.h).

Dump (on our copy of the socket, taken with pidfd_getfd: repair mode is a
property of the socket, so the program's fd sees it too): repair on; for
each queue, TCP_REPAIR_QUEUE then TCP_QUEUE_SEQ (the sequence number after
the queue) and the queue itself with MSG_PEEK (the send queue holds every
byte not acknowledged yet, sent or not); the options the peers agreed on
(MSS clamp, window scales, SACK, timestamps) from TCP_INFO and TCP_MAXSEG
(which answers mss_clamp in repair mode); the timestamp clock
(TCP_TIMESTAMP); the windows (TCP_REPAIR_WINDOW).  The socket stays in
repair mode: if the dump kills the program, closing it in repair mode sends
nothing (tcp_disconnect), and the network lock drops what the peer sends.
A dump that fails, or leaves the program running, turns repair off again.

Restore (in the tool, before the processes are forked): socket, repair on,
bind (IP_FREEBIND: the address may come later), the first sequence number
of each queue, connect (in repair mode: no handshake, straight to
ESTABLISHED), the options, the timestamp clock, the receive queue and the
part of the send queue that had been sent, the windows.  Repair off comes
once every process is built (finish), then the unsent part of the send
queue is sent as the program would have.
"""

from __future__ import annotations

import logging
import select
import socket
import time

from migrate import errors
from migrate.kernel import tcprepair as tr

log = logging.getLogger(__name__)

CHUNK = 64 << 10            # repair-mode sends, one skb each at most this big
UNSENT_WAIT = 10.0          # seconds to push the unsent part after repair off


QUEUES_IMG = "tcp-queues.img"


def dump_stream(s: socket.socket, e, queues=None, buf: bytearray | None = None,
                lengths: tuple[int, int, int] | None = None) -> tuple:
    """Fill ``e`` (tcp_stream_entry) with the connection's repair state; ``s``
    must be in repair mode already.  ``queues``: the tcp-queues.img writer
    (``append(view) -> offset``) the queues go to, peeked into ``buf``
    (reused from one connection to the next; at least as long as both
    queues); without it they go into ``e``.  Returns (bytes to read, not
    acknowledged, of which not sent: ``lengths`` if given, from
    tr.queue_lengths)."""
    lengths = lengths or tr.queue_lengths(s)
    st = tr.read_repair_state(s, lengths, buf if queues is not None else None)
    info, w = st.info, st.window
    e.rcv_seq, e.snd_seq, e.unsq_len, e.mss = st.rcv_seq, st.snd_seq, st.unsq_len, st.mss
    if queues is not None:
        e.queues_off = queues.append(st.inq)
        queues.append(st.outq)
        e.inq_len, e.outq_len = lengths[0], lengths[1]
        st.inq.release()
        st.outq.release()
    else:
        if st.inq:
            e.inq = st.inq
        if st.outq:
            e.outq = st.outq
    opts = info.tcpi_options
    e.sack = bool(opts & tr.TCPI_OPT_SACK)
    e.timestamps = bool(opts & tr.TCPI_OPT_TIMESTAMPS)
    e.wscale = bool(opts & tr.TCPI_OPT_WSCALE)
    e.snd_wscale, e.rcv_wscale = info.tcpi_snd_wscale, info.tcpi_rcv_wscale
    e.timestamp = st.timestamp
    e.snd_wl1, e.snd_wnd, e.max_window, e.rcv_wnd, e.rcv_wup = (
        w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup)
    return lengths


def queue_views(e, queues: memoryview | None, what: str) -> tuple:
    """(receive queue, send queue) of ``e``: views of tcp-queues.img (its
    bytes past the header), bounds checked, or the entry's own bytes."""
    if not (e.inq_len or e.outq_len):
        return e.inq, e.outq
    if queues is None:
        raise errors.RestoreError(f"{what}: its queues are in {QUEUES_IMG}, which the "
                                  "image does not list")
    off, end = e.queues_off, e.queues_off + e.inq_len + e.outq_len
    if end > len(queues):
        raise errors.RestoreError(f"{what}: queues at [{off:#x}, {end:#x}) of {QUEUES_IMG}, "
                                  f"which holds {len(queues):#x} bytes")
    return queues[off:off + e.inq_len], queues[off + e.inq_len:end]


def _fit(s: socket.socket, force: int, opt: int, queued: int, dumped: int) -> None:
    """Make the buffer ``opt`` hold ``queued`` bytes with their skb overhead."""
    if not queued:
        return
    need = 2 * queued + CHUNK
    if s.getsockopt(socket.SOL_SOCKET, opt) >= need:
        return
    # the kernel doubles what is set (man 7 socket)
    tr.setopt(s, socket.SOL_SOCKET, force, max(need, dumped) // 2 + 1,
              "SO_SNDBUFFORCE" if force == tr.SO_SNDBUFFORCE else "SO_RCVBUFFORCE")


def _send_repair(s: socket.socket, data, what: str) -> None:
    """Fill the selected queue: in repair mode a send only queues (the send
    queue's bytes count as sent, the receive queue's as received)."""
    view = memoryview(data)
    while view:
        try:
            n = s.send(view[:CHUNK], socket.MSG_DONTWAIT)
        except OSError as e:
            raise errors.from_errno(f"send({what} in repair mode)", e.errno or 0, None,
                                    f"{len(view)} bytes left of {len(data)}") from None
        view = view[n:]


def restore_stream(s: socket.socket, inet, e, inq, outq) -> memoryview:
    """Make ``s`` (a fresh socket, in repair mode, bound) the connection
    ``e`` (tcp_stream_entry) to inet.dst_addr:dst_port, its queues ``inq``
    and ``outq`` (queue_views).  Returns the part of the send queue never
    sent, for send_unsent."""
    sent = len(outq) - e.unsq_len
    tr.set_queue(s, tr.TCP_SEND_QUEUE)
    tr.set_queue_seq(s, e.snd_seq - len(outq))
    tr.set_queue(s, tr.TCP_RECV_QUEUE)
    tr.set_queue_seq(s, e.rcv_seq - len(inq))
    try:
        s.connect((inet.dst_addr, inet.dst_port))
    except OSError as err:
        raise errors.from_errno("connect(repair mode)", err.errno or 0, None,
                                f"to {inet.dst_addr} port {inet.dst_port}") from None
    opts = [(tr.TCPOPT_MSS, e.mss)]
    if e.wscale:
        opts.append((tr.TCPOPT_WINDOW, e.snd_wscale | e.rcv_wscale << 16))
    if e.sack:
        opts.append((tr.TCPOPT_SACK_PERM, 0))
    if e.timestamps:
        opts.append((tr.TCPOPT_TIMESTAMP, 0))
    tr.set_options(s, opts)
    tr.set_timestamp(s, e.timestamp)
    # A new socket's buffers (tcp_wmem/tcp_rmem defaults) may be smaller than
    # the queues autotuning let the old one hold: a repair-mode send beyond
    # them fails (EAGAIN, ENOMEM).  Raised to what the old one had, or to
    # what the queue needs, only then (a buffer set by hand is no longer
    # autotuned).
    _fit(s, tr.SO_RCVBUFFORCE, socket.SO_RCVBUF, len(inq), inet.rcvbuf)
    _fit(s, tr.SO_SNDBUFFORCE, socket.SO_SNDBUF, len(outq), inet.sndbuf)
    out = memoryview(outq)
    if inq:
        tr.set_queue(s, tr.TCP_RECV_QUEUE)
        _send_repair(s, inq, "receive queue")
    if sent:
        tr.set_queue(s, tr.TCP_SEND_QUEUE)
        _send_repair(s, out[:sent], "send queue")
    tr.set_queue(s, tr.TCP_NO_QUEUE)
    tr.set_window(s, tr.TcpRepairWindow(e.snd_wl1, e.snd_wnd, e.max_window, e.rcv_wnd,
                                        e.rcv_wup))
    return out[sent:]


def send_unsent(s: socket.socket, data: memoryview, what: str) -> None:
    """After repair off: the bytes the program had queued but the kernel had
    not sent yet (restore_stream's answer), sent now as the program's own
    send would have."""
    end = time.monotonic() + UNSENT_WAIT
    while data:
        try:
            data = data[s.send(data, socket.MSG_DONTWAIT):]
            continue
        except BlockingIOError:
            pass
        except OSError as err:
            raise errors.from_errno("send(unsent data)", err.errno or 0, None, what) from None
        left = end - time.monotonic()
        if left <= 0:
            raise errors.RestoreError(f"{what}: {len(data)} bytes of the send queue could "
                                      f"not be queued again in {UNSENT_WAIT:.0f} s")
        select.select([], [s], [], min(left, 0.5))
