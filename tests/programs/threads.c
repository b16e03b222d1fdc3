/*
 * threads: 16 worker threads with per-thread state across dumps.
 *
 * Threads 0-2 wait in pthread_cond_wait, 3-5 in a raw FUTEX_WAIT, 6-11 spin
 * on an LCG (checked after SIGTERM by O(log n) skip-ahead) plus a double
 * counter, 12-15 loop in 50 ms relative clock_nanosleep (each must return 0,
 * not early).  Every thread keeps: its TID, a __thread value, the name
 * "thr-NN", its own blocked mask (always SIGTERM, so main gets it), and some
 * of: two queued, blocked, thread-directed SIGRTMIN+1 (values 1000+i,
 * 2000+i; must stay pending in that thread only and arrive in order, on the
 * altstack where there is one), a sigaltstack (others: SS_DISABLE), nice
 * 1..5, SCHED_BATCH / SCHED_IDLE.  After SIGTERM main wakes everyone, each
 * thread checks itself into its slot, main joins (10 s limit) and reports.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NTHR 16
#define ALT_SIZE (64 * 1024)
#define MS 1000000LL
#define LCG_A 6364136223846793005ULL
#define LCG_C 1442695040888963407ULL
#define gettid_() ((pid_t)syscall(SYS_gettid))

enum kind { K_COND, K_FUTEX, K_SPIN, K_SLEEP };

struct thr {
	int idx, kind, nice, policy, npend;	/* npend: queued SIGRTMIN+1 (0 or 2) */
	pthread_t pt;
	pid_t tid;
	long *tls_addr;
	sigset_t mask;
	char *alt;			/* NULL: no sigaltstack */
	_Atomic uint64_t progress;	/* spin iterations / sleeps done */
	uint64_t base;			/* progress at READY */
	int bad_ret, bad_err, handler_runs, ngot;
	long long bad_took;
	struct { int sig, val, code, on_alt; pid_t tid; } got[4];
	char msg[256];			/* first problem; "" = ok */
};

static struct thr thr[NTHR];
static __thread long tls_val;
static __thread struct thr *self;
static atomic_int nready, go, fword;	/* fword: futex word, 0 until check time */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int cond_go;			/* under mu */
static int rt1;				/* SIGRTMIN + 1 */

static long tls_expect(int i) { return 0x5eed0000L + 7919L * i; }

static void h_rt1(int sig, siginfo_t *si, void *uc)	/* SA_SIGINFO | SA_ONSTACK */
{
	struct thr *t = self;
	char here;

	(void)uc;
	if (!t)
		return;
	t->handler_runs++;
	if (t->ngot < 4)
		t->got[t->ngot].sig = sig, t->got[t->ngot].val = si->si_value.sival_int,
		t->got[t->ngot].code = si->si_code, t->got[t->ngot].tid = gettid_(),
		t->got[t->ngot].on_alt = t->alt && &here >= t->alt && &here < t->alt + ALT_SIZE;
	t->ngot++;
}

static int set_diff(const sigset_t *a, const sigset_t *b)
{
	for (int s = 1; s < 65; s++)
		if (sigismember(a, s) != sigismember(b, s))
			return s;
	return 0;
}

/* Brown's LCG skip-ahead: state after n steps of x = x*A + C from x0. */
static uint64_t lcg_skip(uint64_t x0, uint64_t n)
{
	uint64_t a = LCG_A, c = LCG_C, am = 1, cm = 0;

	for (; n; n >>= 1, c *= a + 1, a *= a)
		if (n & 1)
			am *= a, cm = cm * a + c;
	return am * x0 + cm;
}

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#define CHECK(c, ...) do { if (!(c) && !t->msg[0]) \
	snprintf(t->msg, sizeof(t->msg), __VA_ARGS__); } while (0)

/* Everything that must survive, checked by the thread itself. */
static void check_self(struct thr *t, uint64_t x, uint64_t x0, uint64_t n, double d)
{
	pid_t tid = gettid_();
	sigset_t cur, want;
	stack_t ss = { 0 };
	char name[32] = "", exp_name[16];
	int s, prio, pol;

	CHECK(tid == t->tid, "TID %d, expected %d", (int)tid, (int)t->tid);
	CHECK(&tls_val == t->tls_addr && tls_val == tls_expect(t->idx),
	      "TLS value %#lx at %p, expected %#lx at %p", tls_val, (void *)&tls_val,
	      tls_expect(t->idx), (void *)t->tls_addr);
	pthread_getname_np(pthread_self(), name, sizeof(name));
	snprintf(exp_name, sizeof(exp_name), "thr-%02d", t->idx);
	CHECK(!strcmp(name, exp_name), "name '%s', expected '%s'", name, exp_name);
	pthread_sigmask(SIG_BLOCK, NULL, &cur);
	s = set_diff(&cur, &t->mask);
	CHECK(!s, "blocked mask differs at signal %d (blocked=%d)", s, sigismember(&cur, s));
	sigemptyset(&want);
	if (t->npend)
		sigaddset(&want, rt1);
	sigpending(&cur);
	s = set_diff(&cur, &want);
	CHECK(!s, "pending set differs at signal %d (pending=%d), expected %s", s,
	      sigismember(&cur, s), t->npend ? "{RTMIN+1}" : "{}");
	sigaltstack(NULL, &ss);
	if (t->alt)
		CHECK(ss.ss_sp == t->alt && ss.ss_size == ALT_SIZE && ss.ss_flags == 0,
		      "sigaltstack sp=%p size=%zu flags=%#x, expected %p %d 0", ss.ss_sp,
		      ss.ss_size, ss.ss_flags, (void *)t->alt, ALT_SIZE);
	else
		CHECK(ss.ss_flags == SS_DISABLE, "sigaltstack sp=%p size=%zu flags=%#x, "
		      "expected SS_DISABLE", ss.ss_sp, ss.ss_size, ss.ss_flags);
	errno = 0;
	prio = getpriority(PRIO_PROCESS, (id_t)tid);
	CHECK(prio == t->nice && !errno, "nice %d (errno %d), expected %d", prio, errno, t->nice);
	pol = sched_getscheduler(tid) & ~SCHED_RESET_ON_FORK;
	CHECK(pol == t->policy, "policy %d, expected %d", pol, t->policy);
	CHECK(t->progress > t->base, "no progress after READY (%llu, at READY %llu)",
	      (unsigned long long)t->progress, (unsigned long long)t->base);
	CHECK(x == lcg_skip(x0, n), "LCG %#llx after %llu steps, expected %#llx",
	      (unsigned long long)x, (unsigned long long)n, (unsigned long long)lcg_skip(x0, n));
	CHECK(d == (double)n, "double counter %.1f, expected %llu", d, (unsigned long long)n);
	CHECK(!t->bad_ret && !t->bad_err, "%s returned %d errno %d after %lld ns (handler "
	      "runs %d)", t->kind == K_SLEEP ? "clock_nanosleep" : "futex wait",
	      t->bad_ret, t->bad_err, t->bad_took, t->handler_runs);
	/* Queued signals: none delivered yet; on unblock both, in order, here. */
	CHECK(t->ngot == 0, "%d SIGRTMIN+1 delivered before the final unblock", t->ngot);
	sigemptyset(&want);
	sigaddset(&want, rt1);
	pthread_sigmask(SIG_UNBLOCK, &want, NULL);
	CHECK(t->ngot == t->npend, "%d SIGRTMIN+1 delivered after unblock, expected %d",
	      t->ngot, t->npend);
	for (int k = 0; k < t->npend && k < t->ngot; k++)
		CHECK(t->got[k].sig == rt1 && t->got[k].val == (k + 1) * 1000 + t->idx &&
		      t->got[k].code == SI_QUEUE && t->got[k].tid == t->tid &&
		      t->got[k].on_alt == (t->alt != NULL), "delivery %d: sig %d val %d "
		      "code %d in tid %d on_alt %d, expected %d %d SI_QUEUE %d %d", k + 1,
		      t->got[k].sig, t->got[k].val, t->got[k].code, (int)t->got[k].tid,
		      t->got[k].on_alt, rt1, (k + 1) * 1000 + t->idx, (int)t->tid, !!t->alt);
}

static void *worker(void *arg)
{
	struct thr *t = arg;
	struct sched_param sp = { 0 };
	uint64_t x0 = 0x9e3779b97f4a7c15ULL * (uint64_t)(t->idx + 1), x = x0, n = 0;
	double d = 0;
	char name[16];

	pthread_sigmask(SIG_SETMASK, &t->mask, NULL);
	self = t;
	t->tid = gettid_();
	tls_val = tls_expect(t->idx);
	t->tls_addr = &tls_val;
	snprintf(name, sizeof(name), "thr-%02d", t->idx);
	CHECK(!pthread_setname_np(pthread_self(), name), "setup: pthread_setname_np failed");
	if (t->alt) {
		stack_t ss = { .ss_sp = t->alt, .ss_size = ALT_SIZE, .ss_flags = 0 };

		CHECK(!sigaltstack(&ss, NULL), "setup: sigaltstack: %m");
	}
	if (t->nice)
		CHECK(!setpriority(PRIO_PROCESS, (id_t)t->tid, t->nice), "setup: setpriority: %m");
	if (t->policy != SCHED_OTHER)	/* 0: the calling thread */
		CHECK(!sched_setscheduler(0, t->policy, &sp), "setup: sched_setscheduler: %m");
	atomic_fetch_add(&nready, 1);

	if (t->kind == K_COND) {
		pthread_mutex_lock(&mu);
		while (!cond_go)
			pthread_cond_wait(&cv, &mu);
		pthread_mutex_unlock(&mu);
		t->progress = 1;
	} else if (t->kind == K_FUTEX) {
		while (!atomic_load(&fword)) {
			long r = syscall(SYS_futex, &fword, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);

			/* EAGAIN: woken already; EINTR only if a handler ran here. */
			if (r < 0 && errno != EAGAIN && (errno != EINTR || !t->handler_runs) &&
			    !t->bad_err)
				t->bad_ret = (int)r, t->bad_err = errno;
		}
		t->progress = 1;
	} else if (t->kind == K_SPIN) {
		do {
			for (int k = 0; k < 1024; k++)
				x = x * LCG_A + LCG_C, d += 1.0;
			n += 1024;
			atomic_store_explicit(&t->progress, n, memory_order_relaxed);
		} while (!atomic_load_explicit(&go, memory_order_relaxed));
	} else {
		do {
			const struct timespec req = { 0, 50 * MS };
			long long t0 = now_ns(), took;
			int r = clock_nanosleep(CLOCK_MONOTONIC, 0, &req, NULL);

			took = now_ns() - t0;
			if ((r || took < 49 * MS) && !(r == EINTR && t->handler_runs) && !t->bad_ret)
				t->bad_ret = r ? r : -1, t->bad_took = took;	/* -1: early */
			atomic_fetch_add(&t->progress, 1);
		} while (!atomic_load(&go));
	}
	check_self(t, x, x0, n, d);
	return NULL;
}

int main(int argc, char **argv)
{
	static const int pend[] = { 1, 4, 8, 13, 14 }, nice_idx[] = { 3, 5, 9, 11, 12 };
	static const int alt[] = { 2, 8, 14 };
	const struct timespec ms1 = { 0, MS };
	struct sigaction sa = { 0 };
	struct timespec dl;
	pthread_attr_t attr;
	sigset_t all, old;
	char comm[32] = "", comm2[32] = "";
	pid_t pid = getpid();
	int first = -1;

	test_init(argc, argv);
	rt1 = SIGRTMIN + 1;
	sa.sa_sigaction = h_rt1;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
	if (sigaction(rt1, &sa, NULL))
		fail("sigaction(SIGRTMIN+1): %m");
	prctl(PR_GET_NAME, comm);

	for (int i = 0; i < NTHR; i++) {
		struct thr *t = &thr[i];

		t->idx = i;
		t->kind = i < 3 ? K_COND : i < 6 ? K_FUTEX : i < 12 ? K_SPIN : K_SLEEP;
		t->policy = i == 7 ? SCHED_BATCH : i == 15 ? SCHED_IDLE : SCHED_OTHER;
		sigemptyset(&t->mask);
		sigaddset(&t->mask, SIGTERM);
		sigaddset(&t->mask, SIGRTMIN + 4 + i);	/* distinct per thread */
		if (i & 1) sigaddset(&t->mask, SIGUSR1);
		if (i & 2) sigaddset(&t->mask, SIGUSR2);
		if (i & 4) sigaddset(&t->mask, SIGHUP);
		if (i & 8) sigaddset(&t->mask, SIGWINCH);
	}
	for (int k = 0; k < 5; k++) {
		thr[pend[k]].npend = 2;
		sigaddset(&thr[pend[k]].mask, rt1);
		thr[nice_idx[k]].nice = k + 1;
	}
	for (int k = 0; k < 3; k++)
		if (!(thr[alt[k]].alt = malloc(ALT_SIZE)))
			fail("malloc altstack");

	/* Workers start with everything blocked, then set their own mask. */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 256 * 1024);
	for (int i = 0; i < NTHR; i++)
		if ((errno = pthread_create(&thr[i].pt, &attr, worker, &thr[i])))
			fail("pthread_create %d: %m", i);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	while (atomic_load(&nready) < NTHR)
		nanosleep(&ms1, NULL);
	for (int i = 0; i < NTHR; i++) {
		if (thr[i].msg[0])
			fail("thread %d (tid %d): %s", i, (int)thr[i].tid, thr[i].msg);
		for (int k = 1; k <= thr[i].npend; k++) {
			union sigval v = { .sival_int = k * 1000 + i };

			if ((errno = pthread_sigqueue(thr[i].pt, rt1, v)))
				fail("pthread_sigqueue thread %d: %m", i);
		}
	}
	for (int i = 0; i < 100; i++)	/* ~100 ms: the waiters reach their waits */
		nanosleep(&ms1, NULL);
	for (int i = 0; i < NTHR; i++)
		thr[i].base = thr[i].progress;

	test_ready();
	test_waitsig();

	if (getpid() != pid || gettid_() != pid)
		fail("main: pid %d tid %d, expected %d", (int)getpid(), (int)gettid_(), (int)pid);
	prctl(PR_GET_NAME, comm2);
	if (strcmp(comm, comm2))
		fail("main: comm '%s', expected '%s'", comm2, comm);
	atomic_store(&go, 1);
	pthread_mutex_lock(&mu);
	cond_go = 1;
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
	atomic_store(&fword, 1);
	syscall(SYS_futex, &fword, FUTEX_WAKE_PRIVATE, NTHR, NULL, NULL, 0);

	clock_gettime(CLOCK_REALTIME, &dl);
	dl.tv_sec += 10;
	for (int i = 0; i < NTHR; i++) {	/* print every failure, fail with the first */
		char buf[400];
		int e = pthread_timedjoin_np(thr[i].pt, NULL, &dl);

		if (e)
			snprintf(thr[i].msg, sizeof(thr[i].msg), "not finished 10 s after "
				 "SIGTERM (join: %s)", strerror(e));
		if (!thr[i].msg[0])
			continue;
		snprintf(buf, sizeof(buf), "thread %d (tid %d): %s\n", i, (int)thr[i].tid,
			 thr[i].msg);
		test_msg(buf);
		if (first < 0)
			first = i;
	}
	if (first >= 0)
		fail("thread %d (tid %d): %s", first, (int)thr[first].tid, thr[first].msg);
	pass();
}
