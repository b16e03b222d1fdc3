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


def _netlink(op: str, a, iface: str) -> bool:
    """Add or delete by netlink in this process (pyroute2: ~1 ms, where
    starting `ip` costs ~20 ms of the downtime); False without pyroute2."""
    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        return False
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=iface)
        if not idx:
            raise AddressError(f"no interface {iface}")
        try:
            ipr.addr(op, index=idx[0], address=str(a), prefixlen=a.max_prefixlen)
        except NetlinkError as e:
            if (op, e.code) not in (("add", 17), ("del", 99)):     # EEXIST, EADDRNOTAVAIL
                raise AddressError(f"{op} {a} on {iface}: {os.strerror(e.code)}") from None
    return True


_open: list[socket.socket] = []


def add(ip: str, iface: str) -> None:
    """Add ``ip`` on ``iface`` (already there: fine) and announce it
    (``wait_announced`` closes the announcement's socket, after the
    downtime)."""
    a = _parse(ip)
    if not _netlink("add", a, iface):
        try:
            _ip(["addr", "add", f"{a}/{a.max_prefixlen}", "dev", iface])
        except AddressError as e:
            if "File exists" not in str(e):
                raise
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
    if iface is not None and _netlink("del", a, iface):
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
