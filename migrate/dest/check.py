"""Live migration, on the destination: can this host take a process tree?

The source sends `source.check.requirements()`; every problem found here is
one line naming what is missing, so that the migration stops before
anything was copied, with the process untouched on the source.
"""

from __future__ import annotations

import os

from migrate.kernel import features

# Flags that say nothing about what a program may execute.
_HOST_ONLY = {"hypervisor", "tsc_known_freq", "constant_tsc", "nonstop_tsc", "tsc_reliable",
              "nopl", "xtopology", "cpuid", "rep_good", "arch_perfmon", "pni"}


def problems(req: dict, work_dir: str, margin: float = 1.2) -> list[str]:
    out = []
    taken = [p for p in req.get("pids", []) if os.path.exists(f"/proc/{p}")]
    if taken:
        out.append(f"pid{'s' if len(taken) > 1 else ''} {', '.join(map(str, taken))} "
                   "already in use here")
    missing = [f for f in req.get("files", []) if not os.path.exists(f)]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        out.append(f"file{'s' if len(missing) > 1 else ''} missing here: "
                   f"{', '.join(missing[:5])}{more}")
    here = set(features.cpu_flags())
    lacking = sorted(set(req.get("cpu_flags", [])) - here - _HOST_ONLY)
    if here and lacking:
        out.append(f"CPU features missing here: {' '.join(lacking[:12])}"
                   f"{' ...' if len(lacking) > 12 else ''}")
    need = int(req.get("rss", 0) * margin)
    try:
        os.makedirs(work_dir, exist_ok=True)
        st = os.statvfs(work_dir)
        free = st.f_bavail * st.f_frsize
        if free < need:
            out.append(f"not enough space in {work_dir}: {free >> 20} MiB free, "
                       f"{need >> 20} MiB needed for the image")
    except OSError as e:
        out.append(f"{work_dir}: {e.strerror}")
    for name, probe in (("clone3_set_tid", features.clone3_set_tid),
                        ("ptrace", features.ptrace_scope)):
        try:
            ok, detail = probe()
        except OSError as e:
            ok, detail = False, str(e)
        if not ok:
            out.append(f"kernel: {name}: {detail} (a restore needs it)")
    return out
