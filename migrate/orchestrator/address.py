"""--move-address: the service address goes from the source host to the
destination during the stop phase, so that TCP clients keep their
connections (the restored sockets are bound to it).

The address is added as a /32 on the agent's interface (Linux answers ARP
for any local address), and the destination announces it with gratuitous
ARP (RFC 5227 §3 "ARP Announcement": a request with sender = target = the
address) so that neighbours update their caches at once instead of sending
to the old host until their entry goes stale.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess

from migrate import errors

log = logging.getLogger(__name__)

ETH_P_ARP = 0x0806
ANNOUNCEMENTS = 3


class AddressError(errors.MigrateError):
    """The service address could not be moved."""


def _ip(argv: list[str]) -> str:
    try:
        p = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AddressError(f"ip {' '.join(argv)}: {e}") from None
    if p.returncode != 0:
        raise AddressError(f"ip {' '.join(argv)}: {p.stderr.strip()}")
    return p.stdout


def _parse(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        raise AddressError(f"{ip!r} is not an IP address") from None


def has(ip: str) -> bool:
    a = _parse(ip)
    out = json.loads(_ip(["-j", "addr", "show"]) or "[]")
    return any(ipaddress.ip_address(ai["local"]) == a
               for link in out for ai in link.get("addr_info", []) if "local" in ai)


# rtnetlink, man 7 rtnetlink: one RTM_NEWADDR / RTM_DELADDR and its ack.
# pyroute2 0.9 costs ~2 ms an address (an asyncio loop per IPRoute, a link
# lookup, DEBUG lines) and `ip` ~20 ms; this is one send and one receive
# (~0.1 ms), in the downtime twice (removed at the source, added at the
# destination).
NLMSGHDR = struct.Struct("=IHHII")    # struct nlmsghdr, include/uapi/linux/netlink.h
IFADDRMSG = struct.Struct("=BBBBI")   # struct ifaddrmsg, include/uapi/linux/if_addr.h
RTATTR = struct.Struct("=HH")         # struct rtattr, include/uapi/linux/rtnetlink.h
NLMSG_ERROR = 2
RTM_NEWADDR, RTM_DELADDR = 20, 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFA_ADDRESS, IFA_LOCAL = 1, 2
NETLINK_TIMEOUT_S = 5.0


def _rtattr(kind: int, data: bytes) -> bytes:
    n = RTATTR.size + len(data)
    return RTATTR.pack(n, kind) + data + bytes(-n % 4)      # RTA_ALIGN


def address_message(op: str, a, index: int, seq: int = 1) -> bytes:
    """The RTM_NEWADDR ("add") or RTM_DELADDR ("del") request for ``a`` as
    a host address (/32, /128) on interface ``index``, as `ip addr` sends it."""
    raw = a.packed
    fam = socket.AF_INET if a.version == 4 else socket.AF_INET6
    body = (IFADDRMSG.pack(fam, a.max_prefixlen, 0, 0, index) +
            _rtattr(IFA_LOCAL, raw) + _rtattr(IFA_ADDRESS, raw))
    if op == "add":
        kind, flags = RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    else:
        kind, flags = RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def ack_errno(data: bytes, seq: int = 1) -> int:
    """The errno of the kernel's answer to request ``seq`` (0: done)."""
    if len(data) < NLMSGHDR.size + 4:
        raise AddressError(f"netlink: short answer ({len(data)} bytes)")
    _, kind, _, got, _ = NLMSGHDR.unpack_from(data)
    if kind != NLMSG_ERROR or got != seq:
        raise AddressError(f"netlink: unexpected answer (type {kind}, seq {got})")
    return -struct.unpack_from("=i", data, NLMSGHDR.size)[0]    # struct nlmsgerr


def _netlink(op: str, a, iface: str) -> None:
    """Add or delete ``a`` on ``iface`` (already there, or already gone: fine)."""
    try:
        index = socket.if_nametoindex(iface)
    except OSError:
        raise AddressError(f"no interface {iface}") from None
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           socket.NETLINK_ROUTE) as s:
            s.settimeout(NETLINK_TIMEOUT_S)
            s.bind((0, 0))
            s.send(address_message(op, a, index))
            err = ack_errno(s.recv(4096))
    except OSError as e:
        raise AddressError(f"{op} {a} on {iface}: netlink: {e.strerror or e}") from None
    if err and (op, err) not in (("add", errno.EEXIST), ("del", errno.EADDRNOTAVAIL)):
        raise AddressError(f"{op} {a} on {iface}: {os.strerror(err)}")


_open: list[socket.socket] = []


def add(ip: str, iface: str) -> None:
    """Add ``ip`` on ``iface`` (already there: fine) and announce it
    (``wait_announced`` closes the announcement's socket, after the
    downtime)."""
    a = _parse(ip)
    _netlink("add", a, iface)
    log.info("address %s added on %s", a, iface)
    if a.version == 4:
        try:
            # the socket stays open until wait_announced(): closing a packet
            # socket waits an RCU grace period (tens of ms of downtime), and
            # no thread may do it meanwhile (a restore clones processes that
            # run on in Python: a lock another thread held stays held)
            _open.append(announce(str(a), iface, keep_open=True))
        except OSError as e:
            log.warning("gratuitous ARP for %s on %s: %s", a, iface, e)


def wait_announced() -> None:
    """Close the announcements' sockets (off the downtime)."""
    while _open:
        _open.pop().close()


def remove(ip: str, iface: str | None = None) -> bool:
    a = _parse(ip)
    if iface is not None:
        _netlink("del", a, iface)
        log.info("address %s removed from %s", a, iface)
        return True
    out = json.loads(_ip(["-j", "addr", "show"]) or "[]")
    for link in out:
        for ai in link.get("addr_info", []):
            if "local" in ai and ipaddress.ip_address(ai["local"]) == a:
                _ip(["addr", "del", f"{a}/{ai['prefixlen']}", "dev", link["ifname"]])
                log.info("address %s removed from %s", a, link["ifname"])
                return True
    return False


SIOCGIFHWADDR = 0x8927    # include/uapi/linux/sockios.h


def _mac(iface: str) -> bytes:
    """``iface``'s hardware address, in this process's network namespace
    (SIOCGIFHWADDR, man 7 netdevice; not /sys/class/net, which shows the
    devices of the namespace that mounted /sys: another host's on the rig)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16s16x", iface.encode()[:15])
            res = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, req)
        mac = res[18:24]
    except OSError:
        out = json.loads(_ip(["-j", "link", "show", "dev", iface]) or "[]")
        if not out or "address" not in out[0]:
            raise AddressError(f"{iface}: no hardware address") from None
        mac = bytes.fromhex(out[0]["address"].replace(":", ""))
    if len(mac) != 6 or mac == bytes(6):
        raise AddressError(f"{iface}: no Ethernet hardware address ({mac.hex(':')})")
    return mac


def arp_announcement(ip: str, mac: bytes) -> bytes:
    """An Ethernet frame with an ARP announcement of ``ip`` at ``mac``."""
    addr = socket.inet_aton(ip)
    eth = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + addr + b"\x00" * 6 + addr
    return eth + arp


def announce(ip: str, iface: str, count: int = ANNOUNCEMENTS, keep_open: bool = False):
    """Send ``count`` announcements of ``ip`` on ``iface``; with
    ``keep_open``, return the socket for the caller to close later."""
    # Protocol 0 and sendto(), no bind: a packet socket bound to a protocol
    # hooks into every received frame, and re-binding or closing it waits an
    # RCU grace period (~15 ms here, in the downtime); one that never
    # receives has no hook (man 7 packet).
    frame = arp_announcement(ip, _mac(iface))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        for _ in range(count):
            s.sendto(frame, (iface, ETH_P_ARP))
    except BaseException:
        s.close()
        raise
    if keep_open:
        return s
    s.close()
    return None


def add_now(ip: str, iface: str) -> None:
    """``add``, the announcement's socket closed at once (not in a downtime)."""
    add(ip, iface)
    wait_announced()
