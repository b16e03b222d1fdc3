"""The one exception tree of migrate (CONVENTIONS.md §3).

Every error names what it is about: a pid, an fd, an address (hex), a path
or an offset.  ``kernel/`` converts errno into these classes in one place.
"""

from __future__ import annotations

import errno as _errno
import os


class MigrateError(Exception):
    """Root of every error raised on purpose by migrate."""


class KernelError(MigrateError, OSError):
    """A system call failed.  Carries the syscall name, errno and pid."""

    def __init__(self, syscall: str, err: int, pid: int | None = None,
                 detail: str = "") -> None:
        self.syscall = syscall
        self.pid = pid
        self.detail = detail
        where = f" (pid {pid})" if pid is not None else ""
        extra = f": {detail}" if detail else ""
        name = _errno.errorcode.get(err, str(err))
        msg = f"{syscall}{where} failed with {name} ({os.strerror(err)}){extra}"
        OSError.__init__(self, err, msg)

    def __str__(self) -> str:  # OSError's str adds "[Errno n]": keep ours
        return self.strerror


class NoSuchProcess(KernelError):
    """The pid does not exist (any more)."""


class AccessDenied(KernelError):
    """The kernel refused: EPERM or EACCES."""


class ProcessStateError(MigrateError):
    """A process is in a state we refuse to touch (traced, kernel thread...)."""

    def __init__(self, pid: int, why: str) -> None:
        self.pid = pid
        super().__init__(f"pid {pid}: {why}")


class ImageError(MigrateError):
    """A malformed, truncated, corrupt or wrong-version image file."""

    def __init__(self, path: str, offset: int | None, why: str) -> None:
        self.path = path
        self.offset = offset
        at = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{path}{at}: {why}")


class UnsupportedResource(MigrateError):
    """Process state that this version cannot dump or restore."""

    def __init__(self, pid: int, kind: str, why: str, fd: int | None = None) -> None:
        self.pid = pid
        self.fd = fd
        self.kind = kind
        on = f" fd {fd}" if fd is not None else ""
        super().__init__(f"pid {pid}{on}: unsupported {kind}: {why}")


class RestoreError(MigrateError):
    """A restore could not complete; nothing it started is left running."""


class DumpError(MigrateError):
    """A dump could not complete; the target was left as it was."""


class ProtocolError(MigrateError):
    """A peer broke the wire protocol."""


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol ourselves."""


class RemoteProtocolError(ProtocolError):
    """The remote side sent something malformed."""


def from_errno(syscall: str, err: int, pid: int | None = None,
               detail: str = "") -> KernelError:
    """Pick the KernelError subclass for an errno."""
    if err == _errno.ESRCH:
        return NoSuchProcess(syscall, err, pid, detail)
    if err in (_errno.EPERM, _errno.EACCES):
        return AccessDenied(syscall, err, pid, detail)
    return KernelError(syscall, err, pid, detail)


class PageServerError(MigrateError):
    """The page-server refused or failed a session (disk full, bad name,
    checksum, lost connection...).  ``code`` is the protocol's ERROR code name
    ("NO_SPACE", "CHECKSUM", ...) or "CONNECTION"; ``peer`` is "host:port"."""

    def __init__(self, peer: str, code: str, why: str) -> None:
        self.peer = peer
        self.code = code
        super().__init__(f"page-server {peer}: {why}")


class PageSourceError(MigrateError):
    """Post-copy: the lazy pages' source is lost (the source host died, the
    link broke, a checksum failed); the restored processes are killed."""

    def __init__(self, source: str, why: str) -> None:
        super().__init__(f"page source {source}: {why}")
        self.source = source
        self.why = why


class SourceLinkLost(PageSourceError):
    """Post-copy: a connection to the lazy pages' source broke (reset,
    closed, or silent past the dead-peer timeout).  Unlike a checksum or a
    refusal, the source may still be there: the daemon connects again for a
    while before it gives up (``lazypages.daemon.RECOVER_S``)."""


class NetworkLockError(MigrateError):
    """The network lock (an nftables table or iptables chain of ours) could
    not be set or lifted.  ``name`` is the table or chain."""

    def __init__(self, name: str, why: str) -> None:
        self.name = name
        super().__init__(f"network lock {name}: {why}")


class ThrottleError(MigrateError):
    """Auto-converge could not throttle the tree (no cgroup cpu controller, a
    cgroup file refused a write) or could not remove its cgroup.  ``path`` is
    the cgroup file or directory."""

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        super().__init__(f"cpu throttle {path}: {why}")
