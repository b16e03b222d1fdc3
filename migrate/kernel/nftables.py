"""nftables in-process, through libnftables (libnftables(3)).

The same commands `nft -f` reads, run in the calling process: no `nft`
process to start (about 4 ms to set a table and 10 ms or more to delete
one, against 1 ms and 0.3 ms here).  libnftables.so.1 comes with Debian's
nftables package (libnftables1); where it is missing, ``available()`` is
False and the caller runs `nft` or iptables instead.

One context per process, opened at first use and freed at exit: closing
a netfilter netlink socket waits until the kernel has freed every table
deleted before, by anyone (net/netfilter/nf_tables_api.c nft_rcv_nl_event
flushes the global destroy work, which waits for an RCU grace period: 5
to 15 ms here), though the rules stopped applying at the commit, when
nft_run_cmd_from_buffer returned.  The processes a restore forks close it
with every fd not theirs (resources/files.install_fds); it belongs to the
network namespace the tool was in at first use (the tool never moves).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging

from migrate.kernel._ffi import ffi

log = logging.getLogger(__name__)

LIBRARY = "libnftables.so.1"
NFT_CTX_DEFAULT = 0

_lib = None
_tried = False
_ctx = None


def _load():
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            _lib = ffi.dlopen(LIBRARY)
        except OSError as e:
            log.debug("%s not loaded: %s", LIBRARY, e)
    return _lib


def _free() -> None:
    global _ctx
    if _ctx is not None:
        _lib.nft_ctx_free(_ctx)
        _ctx = None


def available() -> bool:
    """Is libnftables here?"""
    return _load() is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    """What nft_run_cmd_from_buffer returned, and its buffered output and
    error text (what `nft` would print on stdout and stderr)."""
    rc: int
    output: str
    error: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


def _free_kept() -> None:
    global _kept
    if _kept is not None:
        _lib.nft_ctx_free(_kept)
        _kept = None


def open_context() -> bool:
    """Load the library and make the process's context now (a few ms the
    first time), not in the first run(); False if that cannot be done."""
    global _ctx
    lib = _load()
    if lib is None:
        return False
    if _ctx is None:
        ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if ctx == ffi.NULL:
            return False
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        _ctx = ctx
        atexit.register(_free)
    return True


def run(commands: str) -> Result:
    """Run ``commands`` (nft(8) syntax, one per line) as `nft -f` would: in
    one transaction, all or nothing.  The caller checks ``available()``."""
    if _load() is None:
        raise RuntimeError(f"{LIBRARY} is not loaded")
    if not open_context():
        return Result(-1, "", "nft_ctx_new failed")
    lib = _lib
    rc = lib.nft_run_cmd_from_buffer(_ctx, commands.encode())
    # Each get returns what was written since the last one (libnftables(3)).
    return Result(rc, _text(lib.nft_ctx_get_output_buffer(_ctx)),
                  _text(lib.nft_ctx_get_error_buffer(_ctx)).strip())


def _text(p) -> str:
    return ffi.string(p).decode(errors="replace") if p != ffi.NULL else ""
