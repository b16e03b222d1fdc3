"""The network lock: between the dump and the restore, every packet of the
dumped TCP connections is dropped, in both directions, so that neither
side answers the other with a reset (the source has no socket any more,
the destination none yet) and both just see a pause.

nftables: one table of our own, `inet migrate-PID` (PID: the
dumped tree's root), with an input and an output chain at priority -300
(before conntrack) dropping the packets whose addresses and ports are in
a set of the connections (one set for IPv4, one for IPv6); the commands
run in-process through libnftables (kernel/nftables.py), or by `nft`
where the library is missing.
iptables fallback: a chain `MIGRATE-PID` in the filter table of iptables
and ip6tables, jumped to first from INPUT and OUTPUT.  Nothing else is
touched: lifting the lock deletes our table (or our jumps and chain) by
name.  Dump and restore of one tree use the same name, so a restore on the
host of the dump takes over, then lifts, the dump's lock.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import socket
import subprocess
import time

from migrate import errors
from migrate.kernel import nftables

log = logging.getLogger(__name__)

BACKENDS = ("nftables", "iptables", "skip")
PRIORITY = -300


@dataclasses.dataclass(frozen=True, slots=True)
class Conn:
    """One TCP connection, as seen from our side."""
    family: int
    laddr: str
    lport: int
    raddr: str
    rport: int

    @classmethod
    def of(cls, family: int, laddr: str, lport: int, raddr: str, rport: int) -> "Conn":
        """An IPv4 connection on an IPv6 socket (::ffff:a.b.c.d) is IPv4 on
        the wire: its rules must match IPv4 packets."""
        if family == socket.AF_INET6 and laddr.startswith("::ffff:") and "." in laddr:
            return cls(socket.AF_INET, laddr[7:], lport, raddr[7:], rport)
        return cls(family, laddr, lport, raddr, rport)

    def __str__(self) -> str:
        if self.family == socket.AF_INET6:
            return f"[{self.laddr}]:{self.lport} -> [{self.raddr}]:{self.rport}"
        return f"{self.laddr}:{self.lport} -> {self.raddr}:{self.rport}"


def _have_nft() -> bool:
    return nftables.available() or shutil.which("nft") is not None


def choose(backend: str | None) -> str:
    """nftables where libnftables or `nft` exists, else iptables; or the
    one asked for."""
    if backend in (None, "", "nftables"):
        if _have_nft():
            return "nftables"
        if backend == "nftables":
            log.warning("nft is not installed: the network lock falls back to iptables")
        if shutil.which("iptables"):
            return "iptables"
        raise errors.NetworkLockError("migrate", "neither nft nor iptables is installed "
                                      "(or use --network-lock skip and lock it yourself)")
    if backend == "iptables" and not shutil.which("iptables"):
        raise errors.NetworkLockError("migrate", "iptables is not installed")
    if backend not in BACKENDS:
        raise errors.NetworkLockError("migrate", f"unknown backend {backend!r}")
    return backend


def prepare(backend: str | None) -> str:
    """Before the freeze: the backend a lock would use (a clear error now if
    there is none), and libnftables loaded with its context made, so that
    setting the lock, once frozen, is only the command."""
    kind = choose(backend)
    if kind == "nftables":
        nftables.open_context()
    return kind


def _run(argv: list[str], name: str, stdin: str | None = None,
         ok_missing: bool = False) -> bool:
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if p.returncode == 0:
        return True
    if ok_missing:
        return False
    raise errors.NetworkLockError(name, f"{' '.join(argv[:3])}... failed: "
                                        f"{p.stderr.strip() or p.returncode}")


def _nft(commands: str, name: str, ok_missing: bool = False) -> bool:
    """Run nft(8) commands (one transaction): in-process, else by `nft -f`."""
    if not nftables.available():
        return _run(["nft", "-f", "-"], name, commands, ok_missing)
    r = nftables.run(commands)
    if r.ok:
        return True
    if ok_missing:
        return False
    raise errors.NetworkLockError(name, f"nft {commands.splitlines()[0]}... failed: "
                                        f"{r.error or r.rc}")


def _table_lines(t: str) -> list[str]:
    """nft commands: the lock's table and its two hooked chains."""
    return [f"add table {t}",
            f"add chain {t} input {{ type filter hook input priority {PRIORITY}; "
            "policy accept; }",
            f"add chain {t} output {{ type filter hook output priority {PRIORITY}; "
            "policy accept; }"]


def _set_lines(t: str, ip: str, kind: str, name: str) -> list[str]:
    """nft commands: one family's set of connections and its two rules."""
    return [f"add set {t} {name} {{ type {kind} . inet_service . {kind} . inet_service; }}",
            f"add rule {t} input {ip} saddr . tcp sport . {ip} daddr . tcp dport "
            f"@{name} drop",
            f"add rule {t} output {ip} daddr . tcp dport . {ip} saddr . tcp sport "
            f"@{name} drop"]


class NetLock:
    """A lock that is set; ``unlock()`` removes it whatever happened."""

    def __init__(self, pid: int, backend: str) -> None:
        self.pid = pid
        self.backend = backend
        self.conns: list[Conn] = []
        self.held = False
        self.held_sets: set[int] = set()     # families whose set and rules exist
        self.set_us = 0
        self.unset_us = 0

    @property
    def name(self) -> str:
        if self.backend == "iptables":
            return f"MIGRATE-{self.pid}"
        return f"migrate-{self.pid}"

    def add(self, conns: list[Conn]) -> None:
        """Drop the packets of ``conns`` too (sets the lock if not yet)."""
        have = set(self.conns)
        new = [c for c in dict.fromkeys(conns) if c not in have]
        if not new and self.held:
            return
        t0 = time.perf_counter()
        self.held = True          # from here on, unlock() cleans up whatever exists
        if self.backend == "nftables":
            self._nft_add(new)
        else:
            self._ipt_add(new)
        self.conns += new
        self.set_us += int((time.perf_counter() - t0) * 1e6)
        log.info("network lock %s (%s): %d connection(s) locked: %s", self.name,
                 self.backend, len(self.conns), ", ".join(map(str, new)))

    def _nft_add(self, conns: list[Conn]) -> None:
        t = f"inet {self.name}"
        # (a set made: the table and chains are)
        lines = [] if self.held_sets else _table_lines(t)
        made = set()
        for ip, kind, name, fam in (("ip", "ipv4_addr", "conns4", socket.AF_INET),
                                    ("ip6", "ipv6_addr", "conns6", socket.AF_INET6)):
            elems = [f"{c.raddr} . {c.rport} . {c.laddr} . {c.lport}" for c in conns
                     if c.family == fam]
            if not elems:
                continue
            if fam not in self.held_sets:
                # One set lookup per packet whatever the number of
                # connections; elements are (remote address, port, local
                # address, port).  Only for the families locked: each set
                # and its rules cost the transaction ~0.1 ms, in the frozen
                # time.
                lines += _set_lines(t, ip, kind, name)
                made.add(fam)
            lines.append(f"add element {t} {name} {{ {', '.join(elems)} }}")
        _nft("\n".join(lines) + "\n", self.name)
        self.held_sets |= made

    def _ipt_add(self, conns: list[Conn]) -> None:
        ch = self.name
        for tool, fam in (("iptables", socket.AF_INET), ("ip6tables", socket.AF_INET6)):
            mine = [c for c in conns if c.family == fam]
            if not mine and not any(c.family == fam for c in self.conns) and \
                    fam == socket.AF_INET6:
                continue
            _run([tool, "-w", "-N", ch], ch, ok_missing=True)   # may exist already
            for c in mine:
                _run([tool, "-w", "-A", ch, "-p", "tcp", "-s", c.raddr, "--sport",
                      str(c.rport), "-d", c.laddr, "--dport", str(c.lport), "-j", "DROP"], ch)
                _run([tool, "-w", "-A", ch, "-p", "tcp", "-s", c.laddr, "--sport",
                      str(c.lport), "-d", c.raddr, "--dport", str(c.rport), "-j", "DROP"], ch)
            for hook in ("INPUT", "OUTPUT"):
                if not _run([tool, "-w", "-C", hook, "-j", ch], ch, ok_missing=True):
                    _run([tool, "-w", "-I", hook, "1", "-j", ch], ch)

    def unlock(self) -> None:
        """Lift the lock: our table (or chains) deleted by name."""
        t0 = time.perf_counter()
        if self.backend == "nftables":
            # Fails too where there is nothing to delete (never set, or
            # already lifted): only a table still there is an error.
            if not _nft(f"delete table inet {self.name}\n", self.name, ok_missing=True) \
                    and f"nft table inet {self.name}" in exists(self.pid):
                log.error("network lock %s could not be lifted: delete it with "
                          "`nft delete table inet %s`", self.name, self.name)
        elif self.backend == "iptables":
            for tool in ("iptables", "ip6tables"):
                if not shutil.which(tool):
                    continue
                for hook in ("INPUT", "OUTPUT"):
                    while _run([tool, "-w", "-D", hook, "-j", self.name], self.name,
                               ok_missing=True):
                        pass
                _run([tool, "-w", "-F", self.name], self.name, ok_missing=True)
                _run([tool, "-w", "-X", self.name], self.name, ok_missing=True)
        self.unset_us = int((time.perf_counter() - t0) * 1e6)
        if self.held:
            log.info("network lock %s lifted", self.name)
        self.held = False


def exists(pid: int) -> list[str]:
    """The locks of tree ``pid`` present here (for tests and `migrate check`)."""
    out = []
    if nftables.available():
        tables = nftables.run("list tables").output
    elif shutil.which("nft"):
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True,
                                text=True).stdout
    else:
        tables = ""
    if tables:
        if f"table inet migrate-{pid}" in tables.splitlines():
            out.append(f"nft table inet migrate-{pid}")
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool):
            p = subprocess.run([tool, "-w", "-S"], capture_output=True, text=True)
            if f"-N MIGRATE-{pid}" in p.stdout.splitlines():
                out.append(f"{tool} chain MIGRATE-{pid}")
    return out


def unlock_tree(pid: int, backend: str | None = None) -> None:
    """Lift the lock of tree ``pid`` left by a dump (both backends unless
    one is named); nothing to lift is not an error."""
    for kind in ([backend] if backend else ["nftables", "iptables"]):
        if kind == "nftables" and not _have_nft():
            continue
        if kind == "iptables" and not shutil.which("iptables"):
            continue
        NetLock(pid, kind).unlock()


_armed: dict[int, NetLock] = {}


def arm(pid: int, backend: str | None) -> NetLock | None:
    """Before the freeze (or the restore): the table of tree ``pid``'s lock,
    its chains hooked and both families' sets and rules made, the sets
    empty, so that locking is only adding the connections (``lock`` takes
    it).  Hooking base chains is the slow part of a transaction (1-10 ms
    here), and it is no longer in the frozen time.  nftables only; until
    ``lock`` takes it, ``disarm`` removes it."""
    if choose(backend) != "nftables" or pid in _armed:
        return _armed.get(pid)
    lk = NetLock(pid, "nftables")
    t = f"inet {lk.name}"
    lines = _table_lines(t)
    for ip, kind, name in (("ip", "ipv4_addr", "conns4"), ("ip6", "ipv6_addr", "conns6")):
        lines += _set_lines(t, ip, kind, name)
    lk.held = True                  # whatever part exists, unlock() removes it
    try:
        _nft("\n".join(lines) + "\n", lk.name)
    except BaseException:
        lk.unlock()
        raise
    lk.held_sets = {socket.AF_INET, socket.AF_INET6}
    _armed[pid] = lk
    log.debug("network lock %s armed (empty)", lk.name)
    return lk


def disarm(pid: int) -> None:
    """The armed table of ``pid`` goes, if ``lock`` did not take it."""
    lk = _armed.pop(pid, None)
    if lk is not None:
        lk.unlock()


def disarm_all() -> None:
    for pid in list(_armed):
        disarm(pid)


def lock(pid: int, conns: list[Conn], backend: str | None) -> NetLock | None:
    """Set the lock of tree ``pid`` for ``conns`` (None with "skip" or no
    connection).  A failure half-way removes what was set."""
    kind = choose(backend)
    armed = _armed.pop(pid, None)
    if armed is not None and (kind != armed.backend or not conns):
        armed.unlock()
        armed = None
    if kind == "skip" or not conns:
        return None
    lk = armed or NetLock(pid, kind)
    try:
        lk.add(conns)
    except BaseException:
        lk.unlock()
        raise
    return lk


def probe() -> tuple[bool, str]:
    """Can a lock be set and lifted here?  (A table of our own, at once removed.)"""
    try:
        kind = choose(None)
    except errors.NetworkLockError as e:
        return False, str(e)
    import os
    lk = NetLock(os.getpid(), kind)
    try:
        lk.add([Conn(socket.AF_INET, "127.0.0.1", 1, "127.0.0.1", 2)])
    except errors.NetworkLockError as e:
        lk.unlock()
        return False, str(e)
    lk.unlock()
    return True, f"{kind}: lock set and lifted in {lk.set_us / 1000:.1f} + " \
                 f"{lk.unset_us / 1000:.1f} ms"
