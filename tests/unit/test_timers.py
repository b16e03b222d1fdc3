"""Clock arithmetic of resources/timers.py (no task involved)."""

import time

from migrate.resources import timers


def test_cpu_clock_owner():
    # include/linux/posix-timers.h: MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) = (~pid << 3) | 2
    assert timers.cpu_clock_owner(-6) == (0, False)          # CLOCK_PROCESS_CPUTIME_ID
    assert timers.cpu_clock_owner(-2) == (0, True)           # CLOCK_THREAD_CPUTIME_ID
    assert timers.cpu_clock_owner((~1234 << 3) | 2) == (1234, False)
    assert timers.cpu_clock_owner((~77 << 3) | 4 | 2) == (77, True)


def test_rearm_running_clock_takes_elapsed_off():
    flags, at = timers.rearm(timers.CLOCK_MONOTONIC, 5 * timers.NSEC, 2 * timers.NSEC)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert flags == timers.TIMER_ABSTIME
    assert now + 2 * timers.NSEC < at <= now + 3 * timers.NSEC


def test_rearm_past_deadline_is_absolute_in_the_past():
    flags, at = timers.rearm(timers.CLOCK_REALTIME, timers.NSEC, 10 * timers.NSEC)
    assert flags == timers.TIMER_ABSTIME and at < time.clock_gettime_ns(time.CLOCK_REALTIME)


def test_rearm_cpu_clock_is_relative_and_untouched():
    assert timers.rearm(-6, 123, 10 * timers.NSEC) == (0, 123)


def test_elapsed_never_negative():
    assert timers.elapsed_ns(0) == 0
    assert timers.elapsed_ns(timers.now_realtime_ns() + 10 * timers.NSEC) == 0
    assert timers.elapsed_ns(timers.now_realtime_ns() - timers.NSEC) >= timers.NSEC


def test_rearm_alarm_clock_reads_its_base_clock():
    flags, at = timers.rearm(timers.CLOCK_BOOTTIME_ALARM, timers.NSEC, 0)
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    assert flags == timers.TIMER_ABSTIME and now < at <= now + timers.NSEC
