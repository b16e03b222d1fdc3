"""`migrate check`: which kernel features this host has and what each enables."""

from __future__ import annotations

import dataclasses

from migrate import errors
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


# -- live migration: what the destination must have -------------------------

def requirements(pid: int) -> dict:
    """What a destination needs to take ``pid``'s tree: its pids (free
    there), the files it has open or mapped (present there, as on shared
    storage), this host's CPU flags (a superset there), its memory size."""
    from migrate.kernel import proc
    from migrate.source import tree
    pids = tree.pids(pid)
    files: set[str] = set()
    rss = 0
    threads = 0
    for p in pids:
        try:
            for fd in proc.list_fds(p):
                try:
                    target = proc.readlink(p, f"fd/{fd}")
                except errors.MigrateError:
                    continue
                if target.startswith("/") and not target.endswith(" (deleted)") and \
                        not target.startswith(("/proc/", "/dev/pts/")):
                    files.add(target)
            for v in proc.read_maps(p):
                if v.path.startswith("/") and not v.path.endswith(" (deleted)") and \
                        not v.path.startswith(("/dev/", "/memfd:", "/SYSV")):
                    files.add(v.path)
            st = proc.read_status(p)
            rss += int(st.get("VmRSS", "0 kB").split()[0]) * 1024
            threads += int(st.get("Threads", "1"))
        except errors.NoSuchProcess:
            continue
    return {"pid": pid, "pids": pids, "threads": threads, "files": sorted(files),
            "rss": rss, "cpu_flags": features.cpu_flags()}
