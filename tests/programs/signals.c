/*
 * signals: signal dispositions, blocked mask, pending (queued) signals,
 * sigaltstack and an interval timer across dumps.
 *
 * Setup: handlers with SA_SIGINFO / SA_RESTART / SA_NODEFER / SA_ONSTACK and
 * a non-empty sa_mask, SIGPIPE and SIGTRAP ignored, SIGUSR1 and SIGRTMIN+2
 * blocked with SIGUSR1 pending once and SIGRTMIN+2 queued twice (values 11,
 * 22), a malloc'd sigaltstack and ITIMER_REAL with a 1000 s interval.
 * After SIGTERM every disposition (1..SIGRTMAX) must equal the pre-READY
 * snapshot, then the signals are raised/unblocked to prove they still work.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define MAXSIG 65
#ifndef SA_RESTORER
#define SA_RESTORER 0x04000000	/* added by glibc behind our back; not compared */
#endif
#define ALT_SIZE (64 * 1024)

struct event { int sig, val, code; pid_t pid; };
static volatile struct event ev[8];
static volatile int nev;
static volatile int usr1_mask_ok = -1, hup_depth, hup_max, usr2_on_alt = -1;
static char *altstack;
static int rt2;	/* SIGRTMIN + 2; SIGRTMIN is not a constant in glibc */

static void h_info(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	if (nev < 8) {
		ev[nev].sig = sig;
		ev[nev].val = si->si_value.sival_int;
		ev[nev].code = si->si_code;
		ev[nev].pid = si->si_pid;
	}
	nev++;
	if (sig == SIGUSR1) {	/* sa_mask must be in effect inside the handler */
		sigset_t cur;

		sigprocmask(SIG_BLOCK, NULL, &cur);
		usr1_mask_ok = sigismember(&cur, SIGUSR2) && sigismember(&cur, SIGHUP) &&
			       sigismember(&cur, rt2) && sigismember(&cur, SIGUSR1);
	}
}

static void h_hup(int sig)	/* SA_NODEFER: raising again nests at once */
{
	if (++hup_depth > hup_max)
		hup_max = hup_depth;
	if (hup_depth == 1)
		raise(sig);
	hup_depth--;
}

static void h_usr2(int sig, siginfo_t *si, void *uc)	/* SA_ONSTACK */
{
	char here;

	(void)sig; (void)si; (void)uc;
	usr2_on_alt = &here >= altstack && &here < altstack + ALT_SIZE;
}

static void h_alrm(int sig)
{
	(void)sig;	/* the 1000 s timer never fires during a test */
}

/* SIGKILL/SIGSTOP cannot be queried; glibc keeps 32..SIGRTMIN-1 for itself. */
static int skip_sig(int s)
{
	return s == SIGKILL || s == SIGSTOP || (s >= 32 && s < SIGRTMIN);
}

static struct sigaction want[MAXSIG], before[MAXSIG];

static void set(int sig, void *fn, int flags, int m1, int m2, int m3)
{
	struct sigaction *sa = &want[sig];

	memset(sa, 0, sizeof(*sa));
	sa->sa_sigaction = (void (*)(int, siginfo_t *, void *))fn;
	sa->sa_flags = flags;
	sigemptyset(&sa->sa_mask);
	if (m1) sigaddset(&sa->sa_mask, m1);
	if (m2) sigaddset(&sa->sa_mask, m2);
	if (m3) sigaddset(&sa->sa_mask, m3);
	if (sigaction(sig, sa, NULL))
		fail("sigaction(%d) setup: %m", sig);
}

/* Compare only signals 1..64: glibc copies just the kernel's 64-bit mask. */
static int set_diff(const sigset_t *a, const sigset_t *b)
{
	for (int s = 1; s < MAXSIG; s++)
		if (sigismember(a, s) != sigismember(b, s))
			return s;
	return 0;
}

static void compare(const char *when, int sig, const struct sigaction *got,
		    const struct sigaction *exp)
{
	int d;

	if ((void *)got->sa_handler != (void *)exp->sa_handler)
		fail("%s: signal %d handler %p, expected %p", when, sig,
		     (void *)got->sa_handler, (void *)exp->sa_handler);
	if ((got->sa_flags & ~SA_RESTORER) != (exp->sa_flags & ~SA_RESTORER))
		fail("%s: signal %d flags %#x, expected %#x", when, sig,
		     got->sa_flags & ~SA_RESTORER, exp->sa_flags & ~SA_RESTORER);
	if ((d = set_diff(&got->sa_mask, &exp->sa_mask)))
		fail("%s: signal %d sa_mask differs at signal %d (got %d)", when, sig, d,
		     sigismember(&got->sa_mask, d));
}

int main(int argc, char **argv)
{
	struct itimerval it = { { 1000, 0 }, { 1000, 0 } }, it0, it1;
	const struct timespec nap = { 0, 100 * 1000 * 1000 };
	struct sigaction cur;
	sigset_t blk, got;
	stack_t ss = { 0 };
	union sigval v;
	pid_t me = getpid();
	int d;

	test_init(argc, argv);
	rt2 = SIGRTMIN + 2;

	set(SIGUSR1, h_info, SA_SIGINFO | SA_RESTART, SIGUSR2, SIGHUP, rt2);
	set(rt2, h_info, SA_SIGINFO, 0, 0, 0);
	set(SIGHUP, h_hup, SA_NODEFER, 0, 0, 0);
	set(SIGUSR2, h_usr2, SA_SIGINFO | SA_ONSTACK, SIGINT, 0, 0);
	set(SIGALRM, h_alrm, SA_RESTART, 0, 0, 0);
	set(SIGPIPE, SIG_IGN, 0, 0, 0, 0);
	set(SIGTRAP, SIG_IGN, 0, 0, 0, 0);

	if (!(altstack = malloc(ALT_SIZE)))
		fail("malloc altstack");
	ss.ss_sp = altstack;
	ss.ss_size = ALT_SIZE;
	if (sigaltstack(&ss, NULL))
		fail("sigaltstack: %m");

	sigemptyset(&blk);
	sigaddset(&blk, SIGUSR1);
	sigaddset(&blk, rt2);
	sigprocmask(SIG_SETMASK, &blk, NULL);
	kill(me, SIGUSR1);
	v.sival_int = 11;
	sigqueue(me, rt2, v);
	v.sival_int = 22;
	sigqueue(me, rt2, v);

	if (setitimer(ITIMER_REAL, &it, NULL))
		fail("setitimer: %m");

	/* Snapshot all dispositions; check our setup took effect as asked. */
	for (int s = 1; s < MAXSIG; s++) {
		if (skip_sig(s))
			continue;
		if (sigaction(s, NULL, &before[s]))
			fail("sigaction(%d) query: %m", s);
		if (want[s].sa_handler)
			compare("setup", s, &before[s], &want[s]);
	}
	getitimer(ITIMER_REAL, &it0);

	test_ready();
	/*
	 * Not test_waitsig(): its sigsuspend()/sigprocmask() would re-install the
	 * mask from memory and hide a blocked mask lost by a restore.
	 */
	while (!test_stop)
		nanosleep(&nap, NULL);

	/* 1. Static state. */
	for (int s = 1; s < MAXSIG; s++) {
		if (skip_sig(s))
			continue;
		if (sigaction(s, NULL, &cur))
			fail("sigaction(%d) query after restore: %m", s);
		compare("after restore", s, &cur, &before[s]);
	}
	sigprocmask(SIG_BLOCK, NULL, &got);
	if ((d = set_diff(&got, &blk)))
		fail("blocked mask differs at signal %d (blocked=%d)", d, sigismember(&got, d));
	sigpending(&got);
	if ((d = set_diff(&got, &blk)))
		fail("pending set differs at signal %d (pending=%d), expected {USR1, RTMIN+2}",
		     d, sigismember(&got, d));
	memset(&ss, 0, sizeof(ss));
	sigaltstack(NULL, &ss);
	if (ss.ss_sp != altstack || ss.ss_size != ALT_SIZE || ss.ss_flags != 0)
		fail("sigaltstack: got sp=%p size=%zu flags=%#x, expected %p %d 0",
		     ss.ss_sp, ss.ss_size, ss.ss_flags, (void *)altstack, ALT_SIZE);
	getitimer(ITIMER_REAL, &it1);
	if (it1.it_interval.tv_sec != 1000 || it1.it_interval.tv_usec != 0)
		fail("itimer interval %ld.%06ld, expected 1000.000000",
		     (long)it1.it_interval.tv_sec, (long)it1.it_interval.tv_usec);
	if (!timerisset(&it1.it_value) || timercmp(&it1.it_value, &it0.it_value, >))
		fail("itimer value %ld.%06ld, expected > 0 and <= %ld.%06ld (pre-READY)",
		     (long)it1.it_value.tv_sec, (long)it1.it_value.tv_usec,
		     (long)it0.it_value.tv_sec, (long)it0.it_value.tv_usec);

	/* 2. The dispositions still behave as set up. */
	raise(SIGPIPE);	/* ignored: must not kill us */
	raise(SIGTRAP);
	raise(SIGHUP);
	if (hup_max != 2)
		fail("SIGHUP (SA_NODEFER) nesting depth %d, expected 2", hup_max);
	raise(SIGUSR2);
	if (usr2_on_alt != 1)
		fail("SIGUSR2 (SA_ONSTACK) handler %s on the alternate stack",
		     usr2_on_alt < 0 ? "never ran" : "did not run");

	/* 3. Pending signals: USR1 once, then RTMIN+2 with 11 and 22 in order. */
	if (nev != 0)
		fail("%d blocked signal(s) were delivered before unblocking", nev);
	sigprocmask(SIG_UNBLOCK, &blk, NULL);
	if (nev != 3)
		fail("%d pending signals delivered after unblock, expected 3", nev);
	if (ev[0].sig != SIGUSR1 || ev[0].code != SI_USER || ev[0].pid != me)
		fail("1st delivered: sig %d code %d pid %d, expected SIGUSR1 SI_USER pid %d",
		     ev[0].sig, ev[0].code, (int)ev[0].pid, (int)me);
	for (int i = 1; i < 3; i++)
		if (ev[i].sig != rt2 || ev[i].val != 11 * i || ev[i].code != SI_QUEUE ||
		    ev[i].pid != me)
			fail("delivery %d: sig %d value %d code %d pid %d, expected "
			     "SIGRTMIN+2 (%d) value %d SI_QUEUE pid %d", i + 1, ev[i].sig,
			     ev[i].val, ev[i].code, (int)ev[i].pid, rt2, 11 * i, (int)me);
	if (usr1_mask_ok != 1)
		fail("SIGUSR1 handler ran without its sa_mask {USR2, HUP, RTMIN+2, USR1}");
	sigpending(&got);
	sigemptyset(&blk);
	if ((d = set_diff(&got, &blk)))
		fail("signal %d still pending after delivery", d);
	pass();
}
