/*
 * timers: POSIX timers (timer_create) at their ids with gaps, on every kind
 * of clock and notification, armed and disarmed, one-shot and periodic,
 * plus interval timers and timerfds.  "Time goes on": the time spent dumped
 * counts, so after any number of dump/restore cycles
 *  - the remaining time of a timer on a wall or boot clock is its deadline
 *    minus now (within 0.5 s; stopped time would add the dumped time),
 *  - a periodic 20 ms timer has counted (signals + overruns) at least 3/4
 *    of the periods since it was armed,
 *  - a one-shot timer fired once, not before its deadline,
 * and every timer still sends its own signal with its own value and id,
 * to its own thread (SIGEV_THREAD_ID to a second thread).
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <stdio.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <time.h>
#include <pthread.h>
#include <unistd.h>

#define NSEC 1000000000LL
#define PERIOD_NS (20 * 1000000LL)
#define SLACK_NS (NSEC / 2)

static timer_t tid[16];
static volatile pid_t worker_tid;
static volatile long worker_count;
static volatile int worker_stop, worker_wrong_thread;
static volatile long periodic_count, cpu_count, disarmed_count, oneshot_count;
static volatile long long oneshot_at;
static volatile int bad_signal;
static char bad_msg[128];

static long long now(clockid_t c)
{
	struct timespec ts;

	clock_gettime(c, &ts);
	return ts.tv_sec * NSEC + ts.tv_nsec;
}

static long long ts_ns(struct timespec ts)
{
	return ts.tv_sec * NSEC + ts.tv_nsec;
}

static struct timespec ns_ts(long long ns)
{
	struct timespec ts = { ns / NSEC, ns % NSEC };

	return ts;
}

static void on_timer(int sig, siginfo_t *si, void *uc)
{
	int id, want_id = -1, want_val = -1;

	(void)uc;
	id = si->si_timerid;
	if (sig == SIGUSR1) {
		want_id = 0; want_val = 100;
		periodic_count += 1 + si->si_overrun;
	} else if (sig == SIGRTMIN + 1) {
		want_id = 4; want_val = 104;
		cpu_count++;
	} else if (sig == SIGUSR2) {
		want_id = 5; want_val = 105;
		disarmed_count++;
	} else if (sig == SIGRTMIN + 4) {
		want_id = 10; want_val = 110;
		worker_count++;
		if (gettid() != worker_tid)
			worker_wrong_thread = gettid();
	} else if (sig == SIGRTMIN + 3) {
		want_id = 9; want_val = 109;
		oneshot_count++;
		oneshot_at = now(CLOCK_MONOTONIC);
	}
	if (si->si_code != SI_TIMER || id != want_id || si->si_value.sival_int != want_val) {
		bad_signal = sig;
		snprintf(bad_msg, sizeof(bad_msg), "signal %d: code %d, timer %d, value %d", sig,
			 si->si_code, id, si->si_value.sival_int);
	}
}

static void make_for(int id, clockid_t clk, int notify, int sig, int val, pid_t to)
{
	struct sigevent sev;
	timer_t t;

	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = notify;
	sev.sigev_signo = sig;
	sev.sigev_value.sival_int = val;
	if (notify == SIGEV_THREAD_ID)
		sev._sigev_un._tid = to;
	if (timer_create(clk, &sev, &t))
		fail("timer_create(clock %d) for id %d: %s", clk, id, strerror(errno));
	if ((long)t != id)
		fail("timer created as %ld, expected %d", (long)t, id);
	tid[id] = t;
}

static void make(int id, clockid_t clk, int notify, int sig, int val)
{
	make_for(id, clk, notify, sig, val, gettid());
}

/* A second thread that the signals of timer 10 go to (SIGEV_THREAD_ID). */
static void *worker(void *arg)
{
	struct timespec ts = { 0, 2 * 1000 * 1000 };
	sigset_t set;

	(void)arg;
	sigemptyset(&set);
	sigaddset(&set, SIGRTMIN + 4);
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	sigemptyset(&set);
	sigaddset(&set, SIGTERM);	/* for the main thread, asleep in sigsuspend */
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	worker_tid = gettid();
	while (!worker_stop)
		nanosleep(&ts, NULL);
	return NULL;
}

static void arm(int id, int flags, long long value, long long interval)
{
	struct itimerspec its = { ns_ts(interval), ns_ts(value) };

	if (timer_settime(tid[id], flags, &its, NULL))
		fail("timer_settime(%d): %s", id, strerror(errno));
}

static struct itimerspec get(int id)
{
	struct itimerspec its;

	if (timer_gettime(tid[id], &its))
		fail("timer_gettime(%d): %s", id, strerror(errno));
	return its;
}

/* The timer's remaining time is deadline - now(clk), give or take SLACK_NS. */
static void check_deadline(const char *what, long long left, long long deadline, clockid_t clk)
{
	long long want = deadline - now(clk);

	if (left < want - SLACK_NS || left > want + SLACK_NS)
		fail("%s: %.3f s left, expected %.3f s (time must go on while dumped)", what,
		     left / 1e9, want / 1e9);
}

static void burn_cpu(long long ns)
{
	long long end = now(CLOCK_PROCESS_CPUTIME_ID) + ns;

	while (now(CLOCK_PROCESS_CPUTIME_ID) < end)
		;
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	struct itimerspec its;
	struct itimerval itv;
	long long start, t1_deadline, t3_deadline, t9_deadline, real_deadline, tfd_deadline,
		tfa_deadline, expected;
	int sigs[] = { SIGUSR1, SIGUSR2, SIGRTMIN + 1, SIGRTMIN + 3, SIGRTMIN + 4, SIGRTMIN,
		       SIGRTMIN + 2,
		       SIGALRM, SIGVTALRM };
	int tfd, tfa;
	clockid_t main_clock;
	pthread_t th;
	sigset_t only_main;
	struct timespec pause_ts = { 0, 1000 * 1000 };
	unsigned i;

	test_init(argc, argv);
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_timer;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	for (i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
		if (sigaction(sigs[i], &sa, NULL))
			fail("sigaction(%d)", sigs[i]);

	/* SIGRTMIN + 4 is for the worker thread only. */
	sigemptyset(&only_main);
	sigaddset(&only_main, SIGRTMIN + 4);
	sigprocmask(SIG_BLOCK, &only_main, NULL);
	if (pthread_create(&th, NULL, worker, NULL))
		fail("pthread_create");
	while (!worker_tid)
		nanosleep(&pause_ts, NULL);

	/* Ids 0..10 in order; 2, 7 and 8 deleted again: gaps to keep. */
	make(0, CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGUSR1, 100);
	make(1, CLOCK_REALTIME, SIGEV_SIGNAL, SIGRTMIN, 101);
	make(2, CLOCK_MONOTONIC, SIGEV_NONE, 0, 0);
	make(3, CLOCK_BOOTTIME, SIGEV_NONE, 0, 103);
	make(4, CLOCK_PROCESS_CPUTIME_ID, SIGEV_THREAD_ID, SIGRTMIN + 1, 104);
	make(5, CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGUSR2, 105);
	/* The main thread's CPU clock by its tid: CLOCK_THREAD_CPUTIME_ID in a
	 * multi-threaded process would not say which thread (refused). */
	if (pthread_getcpuclockid(pthread_self(), &main_clock))
		fail("pthread_getcpuclockid");
	make(6, main_clock, SIGEV_SIGNAL, SIGRTMIN + 2, 106);
	make(7, CLOCK_MONOTONIC, SIGEV_NONE, 0, 0);
	make(8, CLOCK_MONOTONIC, SIGEV_NONE, 0, 0);
	make(9, CLOCK_MONOTONIC, SIGEV_SIGNAL, SIGRTMIN + 3, 109);
	make_for(10, CLOCK_MONOTONIC, SIGEV_THREAD_ID, SIGRTMIN + 4, 110, worker_tid);
	timer_delete(tid[2]);
	timer_delete(tid[7]);
	timer_delete(tid[8]);

	start = now(CLOCK_MONOTONIC);
	arm(0, 0, PERIOD_NS, PERIOD_NS);
	t1_deadline = now(CLOCK_REALTIME) + 3600 * NSEC;
	arm(1, TIMER_ABSTIME, t1_deadline, 0);
	t3_deadline = now(CLOCK_BOOTTIME) + 1000 * NSEC;
	arm(3, 0, 1000 * NSEC, 7 * NSEC);
	arm(4, 0, 10 * 1000000LL, 10 * 1000000LL);	/* 10 ms of CPU, periodic */
	arm(6, 0, 10 * NSEC, 0);			/* 10 s of this thread's CPU */
	t9_deadline = start + 3 * NSEC;
	arm(9, TIMER_ABSTIME, t9_deadline, 0);
	arm(10, 0, 30 * 1000000LL, 30 * 1000000LL);

	memset(&itv, 0, sizeof(itv));
	itv.it_value.tv_sec = 3600;
	itv.it_interval.tv_sec = 60;
	real_deadline = now(CLOCK_MONOTONIC) + 3600 * NSEC;
	if (setitimer(ITIMER_REAL, &itv, NULL))
		fail("setitimer(ITIMER_REAL)");
	itv.it_value.tv_sec = 100;
	itv.it_interval.tv_sec = 0;
	if (setitimer(ITIMER_VIRTUAL, &itv, NULL))
		fail("setitimer(ITIMER_VIRTUAL)");

	tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
	tfa = timerfd_create(CLOCK_REALTIME, 0);
	if (tfd < 0 || tfa < 0)
		fail("timerfd_create");
	memset(&its, 0, sizeof(its));
	tfd_deadline = now(CLOCK_MONOTONIC) + 1800 * NSEC;
	its.it_value = ns_ts(1800 * NSEC);
	if (timerfd_settime(tfd, 0, &its, NULL))
		fail("timerfd_settime");
	tfa_deadline = now(CLOCK_REALTIME) + 2400 * NSEC;
	its.it_value = ns_ts(tfa_deadline);
	its.it_interval = ns_ts(5 * NSEC);
	if (timerfd_settime(tfa, TFD_TIMER_ABSTIME, &its, NULL))
		fail("timerfd_settime(ABSTIME)");

	test_ready();
	test_waitsig();

	if (bad_signal)
		fail("%s", bad_msg);
	/* The wall and boot clocks: the deadlines hold. */
	its = get(1);
	check_deadline("timer 1 (CLOCK_REALTIME)", ts_ns(its.it_value), t1_deadline, CLOCK_REALTIME);
	if (ts_ns(its.it_interval))
		fail("timer 1 has an interval");
	its = get(3);
	check_deadline("timer 3 (CLOCK_BOOTTIME, SIGEV_NONE)", ts_ns(its.it_value), t3_deadline,
		       CLOCK_BOOTTIME);
	if (ts_ns(its.it_interval) != 7 * NSEC)
		fail("timer 3 interval %lld ns, expected 7 s", ts_ns(its.it_interval));
	its = get(0);
	if (ts_ns(its.it_interval) != PERIOD_NS || !ts_ns(its.it_value) ||
	    ts_ns(its.it_value) > PERIOD_NS)
		fail("timer 0: value %lld ns, interval %lld ns", ts_ns(its.it_value),
		     ts_ns(its.it_interval));
	if (getitimer(ITIMER_REAL, &itv))
		fail("getitimer");
	check_deadline("ITIMER_REAL", itv.it_value.tv_sec * NSEC + itv.it_value.tv_usec * 1000LL,
		       real_deadline, CLOCK_MONOTONIC);
	if (itv.it_interval.tv_sec != 60 || itv.it_interval.tv_usec)
		fail("ITIMER_REAL interval %ld.%06ld", (long)itv.it_interval.tv_sec,
		     (long)itv.it_interval.tv_usec);
	if (getitimer(ITIMER_VIRTUAL, &itv) || itv.it_value.tv_sec > 100 ||
	    (itv.it_value.tv_sec == 0 && itv.it_value.tv_usec == 0))
		fail("ITIMER_VIRTUAL: %ld.%06ld left", (long)itv.it_value.tv_sec,
		     (long)itv.it_value.tv_usec);
	if (timerfd_gettime(tfd, &its))
		fail("timerfd_gettime");
	check_deadline("timerfd (CLOCK_MONOTONIC)", ts_ns(its.it_value), tfd_deadline,
		       CLOCK_MONOTONIC);
	if (timerfd_gettime(tfa, &its))
		fail("timerfd_gettime");
	check_deadline("timerfd (CLOCK_REALTIME, ABSTIME)", ts_ns(its.it_value), tfa_deadline,
		       CLOCK_REALTIME);
	if (ts_ns(its.it_interval) != 5 * NSEC)
		fail("timerfd interval %lld ns", ts_ns(its.it_interval));

	/* The periodic timer counted the dumped time too (signals + overruns). */
	expected = (now(CLOCK_MONOTONIC) - start) / PERIOD_NS;
	if (periodic_count * 4 < expected * 3 || periodic_count > expected + 2)
		fail("periodic timer: %ld expirations counted, %lld periods passed",
		     periodic_count, expected);

	/* The one-shot timer: once, not early (wait for it if it is still ahead). */
	while (!oneshot_count && now(CLOCK_MONOTONIC) < t9_deadline + 30 * NSEC)
		usleep(10000);
	if (oneshot_count != 1)
		fail("one-shot timer 9 fired %ld times", oneshot_count);
	if (oneshot_at < t9_deadline || oneshot_at > t9_deadline + 20 * NSEC)
		fail("one-shot timer 9 fired %.3f s after its deadline",
		     (oneshot_at - t9_deadline) / 1e9);

	/* CPU-time timers: still armed, and they fire when CPU time is used. */
	its = get(6);
	if (!ts_ns(its.it_value) || ts_ns(its.it_value) > 10 * NSEC)
		fail("timer 6 (CLOCK_THREAD_CPUTIME_ID): %lld ns left", ts_ns(its.it_value));
	its = get(4);
	if (ts_ns(its.it_interval) != 10 * 1000000LL)
		fail("timer 4 interval %lld ns", ts_ns(its.it_interval));
	cpu_count = 0;
	burn_cpu(200 * 1000000LL);
	if (cpu_count < 3)
		fail("CPU-time timer 4 fired %ld times in 200 ms of CPU", cpu_count);

	/* The disarmed timer is still disarmed, and still sends its own signal. */
	its = get(5);
	if (ts_ns(its.it_value) || ts_ns(its.it_interval))
		fail("timer 5 was disarmed, now %lld ns left", ts_ns(its.it_value));
	arm(5, 0, 1000000, 0);
	while (!disarmed_count && now(CLOCK_MONOTONIC) < start + 3600 * NSEC)
		usleep(1000);

	/* Timer 10 signals the worker thread, and only it. */
	worker_count = 0;
	{
		long long until = now(CLOCK_MONOTONIC) + 30 * NSEC;

		while (worker_count < 3 && now(CLOCK_MONOTONIC) < until)
			usleep(1000);
		if (worker_count < 3)
			fail("timer 10 (SIGEV_THREAD_ID) fired %ld times in 30 s", worker_count);
	}
	if (worker_wrong_thread)
		fail("timer 10 (SIGEV_THREAD_ID) signalled thread %d, not %d", worker_wrong_thread,
		     worker_tid);
	worker_stop = 1;
	pthread_join(th, NULL);

	/* The gaps are still gaps; the kernel refuses the deleted ids. */
	if (timer_gettime((timer_t)2, &its) == 0 || errno != EINVAL)
		fail("timer id 2 exists after restore");
	if (timer_gettime((timer_t)7, &its) == 0 || timer_gettime((timer_t)8, &its) == 0)
		fail("timer id 7 or 8 exists after restore");
	if (bad_signal)
		fail("%s", bad_msg);
	pass();
}
