"""The convergence policy on canned sequences of rounds (no I/O)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.orchestrator.policy import (PAGE_SIZE, Decision, Policy, PolicyConfig, RoundStats,
                                         parse_rate)

MiB = 1 << 20


def rnd(n, dirty_mib, seconds, sent_mib=None, left_mib=None):
    """Round n copied dirty_mib (all sent) in seconds."""
    sent = dirty_mib if sent_mib is None else sent_mib
    return RoundStats(n, int(sent * MiB), int(sent * MiB) // PAGE_SIZE,
                      int(dirty_mib * MiB) // PAGE_SIZE, seconds,
                      None if left_mib is None else int(left_mib * MiB))


def run(policy, rounds):
    out = []
    for r in rounds:
        d = policy.after_round(r)
        out.append(d)
        if d.action != "continue":
            break
    return out


def test_converging_quickly_stops_with_the_reason():
    # 256 MiB at 256 MiB/s, then 8 MiB dirtied per second: round 2 copies
    # 8 MiB in 1/32 s, which leaves 0.25 MiB: ~1 ms + 50 ms stop cost.
    p = Policy()
    ds = run(p, [rnd(1, 256, 1.0), rnd(2, 8, 8 / 256)])
    assert [d.action for d in ds] == ["continue", "stop"]
    last = ds[-1]
    assert last.bandwidth == pytest.approx(256 * MiB)
    assert last.dirty_rate == pytest.approx(8 * MiB)
    assert last.predicted_downtime == pytest.approx(0.25 / 256 + 0.05, rel=1e-3)
    assert last.reason == "predicted downtime 51 ms under the 300 ms limit"
    assert last.throttle is None
    # the first round predicted a full copy of what it copied (no rate yet)
    assert ds[0].action == "continue" and ds[0].dirty_rate is None
    assert "over the 300 ms limit" in ds[0].reason


def test_known_dirty_bytes_left_are_used():
    p = Policy(PolicyConfig(stop_cost=0.0))
    d = p.after_round(rnd(1, 100, 1.0, left_mib=10))
    assert d.predicted_downtime == pytest.approx(0.1)
    assert d.dirty_rate == pytest.approx(10 * MiB)
    assert d.action == "stop"


def test_min_rounds_is_honoured():
    p = Policy(PolicyConfig(min_rounds=3))
    ds = run(p, [rnd(i, 1, 0.01, left_mib=0) for i in range(1, 10)])
    assert [d.action for d in ds] == ["continue", "continue", "stop"]


def test_never_converging_hits_the_cap():
    # The dirty set keeps shrinking by 20 % a round but from far too high.
    p = Policy(PolicyConfig(max_rounds=5))
    ds = run(p, [rnd(i, 1000 * 0.8 ** i, 1.0, sent_mib=1) for i in range(1, 50)])
    assert len(ds) == 5
    assert ds[-1].action == "stop"
    assert ds[-1].reason.startswith("round cap 5 reached, predicted downtime ")
    assert ds[-1].predicted_downtime > 0.3


def test_nothing_dirtied_stops_even_if_the_stop_itself_is_over_the_limit():
    # A process that writes nothing, and a stop learnt to cost 385 ms (a
    # loaded host): more rounds cannot help; it stopped only at the cap.
    for post_copy in ("off", "auto"):
        p = Policy(PolicyConfig(stop_cost=0.385, post_copy=post_copy))
        ds = run(p, [rnd(1, 48, 0.5)] + [rnd(i, 0, 0.01, left_mib=0) for i in range(2, 40)])
        assert [d.action for d in ds] == ["continue", "stop"]
        assert ds[-1].reason.startswith("nothing left to copy, predicted downtime 385 ms")


# 64 MiB/s link; the process dirties 64 MiB/s: 32 MiB every round of 0.5 s.
STALL = [rnd(1, 32, 0.5)]


def test_stall_stops_with_the_stall_reason():
    p = Policy()
    ds = run(p, STALL + [rnd(i, 32, 0.5) for i in range(2, 30)])
    # round 1 is the best (32 MiB), rounds 2, 3, 4 do not improve on it
    assert len(ds) == 4
    assert ds[-1].action == "stop"
    assert ds[-1].reason.startswith("dirty set stopped shrinking (3 rounds)")
    assert ds[-1].predicted_downtime > 0.3


def test_small_improvements_do_not_count():
    p = Policy(PolicyConfig(min_shrink=0.10))
    sizes = [256, 100, 97, 94, 92, 91]       # under 10 % each: a stall after 100
    ds = run(p, [rnd(i, s, s / 64) for i, s in enumerate(sizes, 1)])
    assert ds[-1].reason.startswith("dirty set stopped shrinking")
    assert len(ds) == 5


@pytest.mark.parametrize("mode,converged,stalled", [
    ("off", "stop", "stop"), ("on", "post-copy", "post-copy"), ("auto", "stop", "post-copy")])
def test_post_copy_modes(mode, converged, stalled):
    p = Policy(PolicyConfig(post_copy=mode))
    assert run(p, [rnd(1, 256, 1.0), rnd(2, 8, 8 / 256)])[-1].action == converged
    p = Policy(PolicyConfig(post_copy=mode))
    ds = run(p, STALL + [rnd(i, 32, 0.5) for i in range(2, 30)])
    assert ds[-1].action == stalled
    p = Policy(PolicyConfig(post_copy=mode, max_rounds=3))
    ds = run(p, [rnd(i, 1000 - i, 1.0, sent_mib=1) for i in range(1, 30)])
    assert ds[-1].action == stalled and ds[-1].reason.startswith("round cap 3")


def test_auto_converge_steps_20_30_to_99():
    # Dirties 128 MiB/s over a 64 MiB/s link: hot every round.
    p = Policy(PolicyConfig(auto_converge=True))
    rounds = [rnd(1, 64, 1.0)] + [rnd(i, 128, 2.0, sent_mib=128) for i in range(2, 40)]
    ds = run(p, rounds)
    steps = []
    for d in ds:
        if d.throttle is not None and (not steps or steps[-1] != d.throttle):
            steps.append(d.throttle)
    assert steps == [20, 30, 40, 50, 60, 70, 80, 90, 99]
    # raised every second hot round, with the reason saying why
    first = next(d for d in ds if d.throttle == 20)
    assert first.reason == ("dirtying 64.0 MiB/s against 64.0 MiB/s sent: CPU throttled by "
                            "20%, predicted downtime 2050 ms over the 300 ms limit")
    # it kept copying while the throttle rose, and gave up only at 99 %
    assert all(d.action == "continue" for d in ds[:-1])
    assert ds[-1].action == "stop" and ds[-1].throttle == 99
    assert len(ds) <= 30


def test_auto_converge_raises_the_throttle_on_a_stall_instead_of_giving_up():
    p = Policy(PolicyConfig(auto_converge=True, throttle_trigger=100))  # never hot
    ds = run(p, STALL + [rnd(i, 32, 0.5) for i in range(2, 40)])
    assert ds[3].action == "continue" and ds[3].throttle == 20
    assert "dirty set stopped shrinking (3 rounds): CPU throttled by 20%" in ds[3].reason
    assert ds[6].throttle == 30
    assert ds[-1].action == "stop"
    assert ds[-1].reason.startswith("round cap 30")


def test_throttle_works_and_the_policy_stops():
    """Once the throttle bites the dirty set shrinks and pre-copy converges."""
    p = Policy(PolicyConfig(auto_converge=True))
    d = p.after_round(rnd(1, 64, 1.0))
    mib = 128.0
    for i in range(2, 31):
        pct = d.throttle or 0
        mib = 128 * (100 - pct) / 100 * (mib / 64)       # dirtied during the last round
        d = p.after_round(rnd(i, mib, mib / 64))
        if d.action != "continue":
            break
    assert d.action == "stop" and d.reason.startswith("predicted downtime")
    assert d.throttle is not None and d.throttle < 99


def test_bandwidth_cap_is_used_in_the_prediction():
    # measured 1 GiB/s, capped at 16 MiB/s: 8 MiB left is 0.5 s, over the limit
    p = Policy(PolicyConfig(max_bandwidth=16 * MiB, stop_cost=0.0))
    d = p.after_round(rnd(1, 1024, 1.0, left_mib=8))
    assert d.bandwidth == 16 * MiB
    assert d.predicted_downtime == pytest.approx(0.5)
    assert d.action == "continue"
    p = Policy(PolicyConfig(stop_cost=0.0))
    d = p.after_round(rnd(1, 1024, 1.0, left_mib=8))
    assert d.bandwidth == 1024 * MiB and d.action == "stop"


def test_bandwidth_is_measured_over_the_last_rounds():
    p = Policy()
    p.after_round(rnd(1, 100, 1.0))
    p.after_round(rnd(2, 100, 1.0))
    p.after_round(rnd(3, 100, 1.0))
    d = p.after_round(rnd(4, 1, 1.0))           # round 1 falls out of the window
    assert d.bandwidth == pytest.approx(201 * MiB / 3)


def test_stop_cost_observed():
    p = Policy(PolicyConfig(stop_cost=1.0))
    p.observe_stop_cost(0.1)
    assert p.stop_cost == 0.1
    p.observe_stop_cost(0.3)
    assert p.stop_cost == pytest.approx(0.2)
    d = p.after_round(rnd(1, 10, 1.0, left_mib=0))
    assert d.predicted_downtime == pytest.approx(0.2)


def test_no_bandwidth_yet_predicts_infinity():
    p = Policy()
    d = p.after_round(RoundStats(1, 0, 0, 100, 1.0))
    assert d.predicted_downtime == math.inf and d.action == "continue"
    assert "inf ms" in d.reason


def test_after_the_end_it_refuses():
    p = Policy()
    p.after_round(rnd(1, 1, 1.0, left_mib=0))
    with pytest.raises(ValueError, match="already ended"):
        p.after_round(rnd(2, 1, 1.0))


@pytest.mark.parametrize("kw", [{"post_copy": "maybe"}, {"min_rounds": 0},
                                {"min_rounds": 5, "max_rounds": 4}, {"max_bandwidth": 0},
                                {"downtime_limit": -1}, {"throttle_max": 100}])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        PolicyConfig(**kw)


rounds_st = st.lists(st.builds(
    RoundStats, round=st.integers(0, 100), bytes_sent=st.integers(0, 1 << 36),
    pages_sent=st.integers(0, 1 << 24), pages_dirty=st.integers(0, 1 << 24),
    seconds=st.floats(0, 100, allow_nan=False),
    dirty_bytes_left=st.one_of(st.none(), st.integers(0, 1 << 36))), min_size=60, max_size=60)


@settings(max_examples=300, deadline=None)
@given(rounds=rounds_st, max_rounds=st.integers(1, 40), auto=st.booleans(),
       post_copy=st.sampled_from(["off", "on", "auto"]),
       cap=st.one_of(st.none(), st.integers(1, 1 << 32)))
def test_any_sequence_ends_by_max_rounds(rounds, max_rounds, auto, post_copy, cap):
    p = Policy(PolicyConfig(max_rounds=max_rounds, auto_converge=auto, post_copy=post_copy,
                            max_bandwidth=cap))
    ds = run(p, rounds)
    assert len(ds) <= max_rounds
    assert ds[-1].action in ("stop", "post-copy")
    for d in ds:
        assert isinstance(d, Decision)
        assert d.predicted_downtime >= 0 and d.bandwidth >= 0
        assert d.dirty_rate is None or d.dirty_rate >= 0
        assert d.throttle is None or (auto and 20 <= d.throttle <= 99)
        if cap is not None:
            assert d.bandwidth <= cap
    if post_copy == "off":
        assert ds[-1].action == "stop"


@pytest.mark.parametrize("text,value", [
    ("50M", 50 << 20), ("1G", 1 << 30), ("1g", 1 << 30), ("512k", 512 << 10),
    ("100000", 100000), ("1.5M", 3 << 19), ("64MiB/s", 64 << 20), ("2 GB", 2 << 30),
    ("1T", 1 << 40)])
def test_parse_rate(text, value):
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["", "M", "0", "0M", "-5M", "5X", "fast", "1e9"])
def test_parse_rate_refuses(text):
    with pytest.raises(ValueError, match="bad rate"):
        parse_rate(text)
