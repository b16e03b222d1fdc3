"""Filesystem context of a process: cwd and root."""

from __future__ import annotations

import os

from migrate import errors
from migrate.images._pb import files_pb2
from migrate.kernel import proc


def dump(pid: int):
    cwd = proc.readlink(pid, "cwd")
    root = proc.readlink(pid, "root")
    for what, path in (("cwd", cwd), ("root", root)):
        if path.endswith(" (deleted)"):
            raise errors.UnsupportedResource(pid, what, f"{what} {path} was removed")
    return files_pb2.fs_entry(cwd=cwd, root=root)


def check(e) -> None:
    for what, path in (("cwd", e.cwd), ("root", e.root)):
        if not os.path.isdir(path):
            raise errors.RestoreError(f"{what} {path} is not a directory here")


def restore_cwd(e) -> None:
    """Runs in the new task.  The root is changed last, by remote chroot, since
    every later path (mapped files, exe) is resolved from our root."""
    os.chdir(e.cwd)
