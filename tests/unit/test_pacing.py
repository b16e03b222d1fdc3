"""pageserver.pacing.RateLimit on a fake clock, and the --max-bandwidth flag."""

import threading

import pytest

from migrate import cli
from migrate.pageserver.pacing import MIN_BURST, SLICE, RateLimit


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.slept = []

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


def limiter(rate, burst=None):
    c = FakeClock()
    return RateLimit(rate, burst, clock=c, sleep=c.sleep), c


def test_the_first_burst_is_free_then_the_rate_holds():
    r, c = limiter(1000, burst=500)
    r.take(500)
    assert c.slept == [] and c.now == 100.0
    r.take(250)
    assert c.slept == [0.25]
    # 10,000 bytes in slices of 100 take 10 s at 1000 bytes/s
    t0 = c.now
    for _ in range(100):
        r.take(100)
    assert c.now - t0 == pytest.approx(10.0)
    assert r.waited == pytest.approx(10.25)


def test_idle_time_refills_up_to_the_burst_only():
    r, c = limiter(1000, burst=500)
    r.take(500)
    c.now += 60                      # a minute idle: still only 500 free
    r.take(500)
    assert c.slept == []
    r.take(1)
    assert c.slept == [pytest.approx(0.001)]


def test_partial_refill():
    r, c = limiter(1000, burst=1000)
    r.take(1000)
    c.now += 0.3                     # 300 back
    assert r.reserve(500) == pytest.approx(0.2)


def test_a_send_bigger_than_the_burst_waits_its_share():
    r, c = limiter(1 << 20, burst=64 << 10)
    r.take(8 << 20)
    assert c.slept == [pytest.approx((8 * 1024 - 64) / 1024)]


def test_default_burst_and_slice():
    r, _ = limiter(64 << 20)
    assert r.burst == int((64 << 20) * 0.05)
    assert r.slice == SLICE
    r, _ = limiter(100 << 10)
    assert r.burst == MIN_BURST and r.slice == MIN_BURST


def test_threads_share_the_rate():
    """Reservations from several threads queue up: the total is paced."""
    r, c = limiter(1000, burst=100)
    lock = threading.Lock()
    delays = []

    def worker():
        for _ in range(10):
            d = r.reserve(100)
            with lock:
                delays.append(d)
    ts = [threading.Thread(target=worker) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    # the clock never moved: 4000 bytes, 100 free, the last waits 3.9 s
    assert sorted(delays)[-1] == pytest.approx(3.9)
    assert sorted(delays)[0] == 0.0


@pytest.mark.parametrize("rate,burst", [(0, None), (-1, None), (10, 0)])
def test_bad_limits(rate, burst):
    with pytest.raises(ValueError):
        RateLimit(rate, burst)


@pytest.mark.parametrize("cmd", ["dump", "pre-dump"])
def test_max_bandwidth_flag(cmd, capsys):
    p = cli.build_parser()
    args = p.parse_args([cmd, "-t", "1", "-D", "d", "--page-server", "--address", "h",
                         "--max-bandwidth", "50M"])
    assert args.max_bandwidth == 50 << 20
    assert p.parse_args([cmd, "-t", "1", "-D", "d"]).max_bandwidth is None
    with pytest.raises(SystemExit):
        p.parse_args([cmd, "-t", "1", "-D", "d", "--max-bandwidth", "lots"])
    assert "bad rate 'lots'" in capsys.readouterr().err


def test_max_bandwidth_needs_a_page_server():
    args = cli.build_parser().parse_args(["pre-dump", "-t", "1", "-D", "d",
                                          "--max-bandwidth", "1G"])
    with pytest.raises(SystemExit, match="--max-bandwidth needs --page-server"):
        cli._sink(args)
