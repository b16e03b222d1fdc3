/*
 * sleeper: a process that is almost always inside a sleeping syscall
 * (clock_nanosleep, nanosleep, poll, select), so dumps catch it mid-syscall
 * and restores must restart those calls correctly.  Every call must return
 * 0 (and not before its timeout) or fail with EINTR, and EINTR only once
 * SIGTERM has been taken: a broken restart shows up as errno 512..516
 * (ERESTART*), EFAULT, a spurious EINTR or an early return.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <sys/select.h>
#include <time.h>

#define MS 1000000LL

static long calls;
static char bad[256];	/* first problem seen; reported after SIGTERM */

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ret: 0 on success, else -1 with err set (clock_nanosleep is converted). */
static void check(const char *call, int ret, int err, long long t0, long long req)
{
	long long took = now_ns() - t0;

	calls++;
	if (bad[0])
		return;
	if (ret == 0) {
		/* 1 ms slack only for clock read granularity; restarts sleep longer. */
		if (took < req - MS)
			snprintf(bad, sizeof(bad), "%s returned 0 after %lld ns, asked %lld ns "
				 "(call #%ld)", call, took, req, calls);
	} else if (err == EINTR) {
		if (!test_stop)
			snprintf(bad, sizeof(bad), "%s failed with EINTR but no signal was "
				 "taken (call #%ld)", call, calls);
	} else {
		snprintf(bad, sizeof(bad), "%s returned %d, errno %d (call #%ld)%s", call,
			 ret, err, calls, err >= 512 && err <= 516 ? ": leaked ERESTART*" : "");
	}
}

int main(int argc, char **argv)
{
	const struct timespec req_cns = { 0, 200 * MS }, req_ns = { 0, 50 * MS };
	struct timespec rem;
	struct timeval tv;
	long long t0;
	int r;

	test_init(argc, argv);
	test_ready();

	while (!test_stop) {
		t0 = now_ns();
		rem.tv_sec = rem.tv_nsec = -1;
		r = clock_nanosleep(CLOCK_MONOTONIC, 0, &req_cns, &rem);  /* returns errno */
		check("clock_nanosleep(200 ms)", r ? -1 : 0, r, t0, 200 * MS);
		if (r == EINTR && !bad[0] &&
		    (rem.tv_sec != 0 || rem.tv_nsec < 0 || rem.tv_nsec > 200 * MS))
			snprintf(bad, sizeof(bad), "clock_nanosleep EINTR remaining %ld.%09ld s "
				 "not within 0..0.2 s", (long)rem.tv_sec, rem.tv_nsec);
		if (test_stop)
			break;

		t0 = now_ns();
		r = nanosleep(&req_ns, NULL);
		check("nanosleep(50 ms)", r, errno, t0, 50 * MS);
		if (test_stop)
			break;

		t0 = now_ns();
		r = poll(NULL, 0, 150);
		check("poll(NULL, 0, 150)", r, errno, t0, 150 * MS);
		if (test_stop)
			break;

		t0 = now_ns();
		tv.tv_sec = 0;
		tv.tv_usec = 100 * 1000;
		r = select(0, NULL, NULL, NULL, &tv);
		check("select(100 ms)", r, errno, t0, 100 * MS);
	}

	if (bad[0])
		fail("%s", bad);
	/* A relative sleep caught by a dump starts over at the restore (see
	 * docs/architecture.md, syscall-restart fixups): when dump/restore cycles
	 * come faster than the longest sleep, no sleep may end before SIGTERM,
	 * and only the EINTR that SIGTERM causes counts.  That the process took
	 * SIGTERM and got here is the liveness check. */
	if (calls < 1)
		fail("no sleeping call returned, not even with EINTR at SIGTERM");
	pass();
}
