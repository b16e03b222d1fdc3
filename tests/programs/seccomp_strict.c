/*
 * seccomp_strict: the main thread in SECCOMP_MODE_STRICT (only read, write,
 * _exit and sigreturn; anything else is SIGKILL), blocked in read(2) on an
 * empty pipe, which signals interrupt (EINTR) and it enters again.  Strict
 * mode is per thread: a second thread, not in strict mode, waits for
 * SIGTERM, then checks in /proc that the main thread is still in mode 1 and
 * itself in mode 0, and ends the process with the verdict.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <linux/seccomp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static pid_t main_tid;
static volatile int strict_on;

static int mode_of(pid_t tid)
{
	char path[64], line[256];
	FILE *f;
	int mode = -1;

	snprintf(path, sizeof(path), "/proc/self/task/%d/status", tid);
	if (!(f = fopen(path, "r")))
		fail("open %s", path);
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, "Seccomp:", 8))
			mode = atoi(line + 8);
	fclose(f);
	return mode;
}

static void *checker(void *arg)
{
	struct timespec ts = { 0, 5 * 1000 * 1000 };
	int m;

	(void)arg;
	while (!strict_on || mode_of(main_tid) != 1)
		nanosleep(&ts, NULL);
	test_ready();
	while (!test_stop)
		nanosleep(&ts, NULL);
	if ((m = mode_of(main_tid)) != 1)
		fail("main thread in seccomp mode %d, expected 1 (strict)", m);
	if ((m = mode_of(gettid())) != 0)
		fail("checker thread in seccomp mode %d, expected 0", m);
	pass();		/* exit_group from this thread: allowed here */
}

int main(int argc, char **argv)
{
	pthread_t th;
	int pfd[2];
	char c;

	test_init(argc, argv);
	main_tid = gettid();
	if (pipe(pfd))
		fail("pipe");
	if (pthread_create(&th, NULL, checker, NULL))
		fail("pthread_create");
	if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0))
		fail("PR_SET_SECCOMP");
	strict_on = 1;
	for (;;)
		syscall(SYS_read, pfd[0], &c, 1);	/* EINTR on each signal */
}
