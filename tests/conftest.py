
import os
import subprocess

import pytest

from migrate.kernel import syscalls


@pytest.fixture(scope="session", autouse=True)
def subreaper():
    """Restored processes are reparented to us, so we can reap them."""
    syscalls.set_child_subreaper()
    yield


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    return str(d)


@pytest.fixture
def workloads():
    started = []
    yield started
    for w in started:
        w.kill()


@pytest.fixture
def mounts():
    """mount(path, opts): a tmpfs of ours, unmounted at the end of the test."""
    done = []

    def mount(path: str, opts: str) -> str:
        os.makedirs(path, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], check=True)
        done.append(path)
        return path
    yield mount
    for path in reversed(done):
        subprocess.run(["umount", path], check=False)
