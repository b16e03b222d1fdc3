
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
