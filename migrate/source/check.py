"""`migrate check`: which kernel features this host has and what each enables."""

from __future__ import annotations

import dataclasses

from migrate.kernel import features


@dataclasses.dataclass
class Result:
    name: str
    ok: bool
    detail: str
    disables: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# name -> (probe, what is lost without it)
FEATURES = {
    "ptrace": (features.ptrace_scope, "every dump (freezing needs ptrace)"),
    "pagemap_scan": (features.pagemap_scan,
                     "fast present-page scans and uffd dirty tracking"),
    "uffd_wp_async": (features.uffd_wp_async,
                      "pre-dump dirty tracking without soft-dirty"),
    "soft_dirty": (features.soft_dirty, "the soft-dirty fallback tracker"),
    "pidfd_getfd": (features.pidfd_getfd, "dumping sockets, eventfds and other fds "
                                          "from outside"),
    "clone3_set_tid": (features.clone3_set_tid, "every restore (the PID cannot be chosen)"),
    "set_mm_map": (features.set_mm_map, "restoring exe link, auxv and mm bounds"),
    "sys_resource": (features.sys_resource, "raising hard rlimits on restore (they are "
                                            "capped, with a warning)"),
    "timer_ids": (features.timer_restore_ids, "POSIX timers at their ids without "
                                              "filler timers"),
    "suspend_seccomp": (features.suspend_seccomp, "dump and restore of processes under "
                                                  "seccomp"),
    "tcp_repair": (features.tcp_repair, "--tcp-established"),
    "nftables": (features.nftables, "the nftables network lock (iptables is the fallback)"),
}


def _netlock() -> tuple[bool, str]:
    from migrate.resources import netlock
    return netlock.probe()


FEATURES["network_lock"] = (_netlock, "--tcp-established without --network-lock skip")


def _tracker() -> tuple[bool, str]:
    from migrate.source import tracker
    kind = tracker.choose(None)
    names = {"uffd": "uffd-wp (async) + PAGEMAP_SCAN",
             "soft-dirty": "soft-dirty (clear_refs, frozen rounds)"}
    return bool(kind), names.get(kind, "none: every pre-dump round copies everything")


FEATURES["tracker"] = (_tracker, "incremental pre-dumps")


def run(only: str | None = None) -> list[Result]:
    names = [only] if only else list(FEATURES)
    out = []
    for n in names:
        if n not in FEATURES:
            out.append(Result(n, False, f"unknown feature; known: {', '.join(FEATURES)}", ""))
            continue
        probe, disables = FEATURES[n]
        try:
            ok, detail = probe()
        except OSError as e:
            ok, detail = False, str(e)
        out.append(Result(n, ok, detail, disables))
    return out
