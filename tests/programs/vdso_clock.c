/*
 * vdso_clock: clocks read through the vdso (glibc's clock_gettime and
 * gettimeofday use it) must stay consistent with the real syscalls across
 * restores: for each clock, vdso <= syscall <= vdso; monotonic clocks never
 * go backwards; CLOCK_REALTIME and gettimeofday within 2 s of time(2).
 * After SIGTERM, AT_SYSINFO_EHDR must still be the start of [vdso].
 */
#define _GNU_SOURCE
#include "lib.h"

#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const struct { clockid_t id; const char *name; int monotonic; } clocks[] = {
	{ CLOCK_MONOTONIC, "CLOCK_MONOTONIC", 1 },
	{ CLOCK_MONOTONIC_RAW, "CLOCK_MONOTONIC_RAW", 1 },
	{ CLOCK_BOOTTIME, "CLOCK_BOOTTIME", 1 },
	{ CLOCK_REALTIME, "CLOCK_REALTIME", 0 },
};
#define NCLOCKS (int)(sizeof(clocks) / sizeof(clocks[0]))
#define SLACK_NS 2000000000LL	/* allowed disorder for CLOCK_REALTIME (steps) */

static char bad[256];	/* first problem seen; reported after SIGTERM */

static long long ns(struct timespec ts)
{
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void one_round(long long last[], long iter)
{
	struct timespec a, b, c;
	struct timeval tv;
	long t_sys;

	for (int i = 0; i < NCLOCKS && !bad[0]; i++) {
		long long slack = clocks[i].monotonic ? 0 : SLACK_NS;

		clock_gettime(clocks[i].id, &a);			/* vdso */
		syscall(SYS_clock_gettime, clocks[i].id, &b);		/* kernel */
		clock_gettime(clocks[i].id, &c);			/* vdso */
		if (ns(a) > ns(b) + slack || ns(b) > ns(c) + slack)
			snprintf(bad, sizeof(bad), "%s out of order (iteration %ld): vdso %lld, "
				 "syscall %lld, vdso %lld", clocks[i].name, iter, ns(a), ns(b), ns(c));
		else if (clocks[i].monotonic && ns(a) < last[i])
			snprintf(bad, sizeof(bad), "%s went backwards (iteration %ld): %lld "
				 "after %lld", clocks[i].name, iter, ns(a), last[i]);
		last[i] = ns(c);
	}
	if (bad[0])
		return;

	clock_gettime(CLOCK_REALTIME, &a);
	t_sys = syscall(SYS_time, NULL);
	gettimeofday(&tv, NULL);
	if (a.tv_sec < t_sys - 2 || a.tv_sec > t_sys + 2)
		snprintf(bad, sizeof(bad), "CLOCK_REALTIME %ld s vs time(2) %ld s (iteration %ld)",
			 (long)a.tv_sec, t_sys, iter);
	else if (tv.tv_usec < 0 || tv.tv_usec >= 1000000 ||
		 tv.tv_sec < t_sys - 2 || tv.tv_sec > t_sys + 2)
		snprintf(bad, sizeof(bad), "gettimeofday %ld.%06ld vs time(2) %ld (iteration %ld)",
			 (long)tv.tv_sec, (long)tv.tv_usec, t_sys, iter);
}

int main(int argc, char **argv)
{
	const struct timespec nap = { 0, 10 * 1000 * 1000 };
	long long last[NCLOCKS] = { 0 };
	unsigned long ehdr, lo, hi;
	char line[256], name[64];
	int found = 0;
	long iter = 0;
	FILE *f;

	test_init(argc, argv);
	ehdr = getauxval(AT_SYSINFO_EHDR);
	if (!ehdr)
		fail("no AT_SYSINFO_EHDR: no vdso?");
	one_round(last, iter++);
	test_ready();

	while (!test_stop) {
		one_round(last, iter++);
		nanosleep(&nap, NULL);
	}
	one_round(last, iter++);
	if (bad[0])
		fail("%s", bad);

	if (getauxval(AT_SYSINFO_EHDR) != ehdr)
		fail("AT_SYSINFO_EHDR changed: %#lx, was %#lx", getauxval(AT_SYSINFO_EHDR), ehdr);
	if (!(f = fopen("/proc/self/maps", "r")))
		fail("open /proc/self/maps: %m");
	while (fgets(line, sizeof(line), f)) {
		name[0] = '\0';
		if (sscanf(line, "%lx-%lx %*s %*s %*s %*s %63s", &lo, &hi, name) == 3 &&
		    strcmp(name, "[vdso]") == 0) {
			found = 1;
			break;
		}
	}
	fclose(f);
	if (!found)
		fail("no [vdso] line in /proc/self/maps");
	if (lo != ehdr)
		fail("[vdso] starts at %#lx, AT_SYSINFO_EHDR is %#lx", lo, ehdr);
	if (memcmp((void *)ehdr, "\177ELF", 4))
		fail("no ELF header at vdso %#lx", ehdr);
	pass();
}
