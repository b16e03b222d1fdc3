/*
 * fsstate: per-process "environment" state across dumps: session/process
 * group leadership (setsid), cwd inside a temp dir, umask, rlimits (soft and
 * hard, all of them compared) and the comm name.
 * The cwd is /tmp/fsstate.XXXXXX/work (removed at exit).  setsid() needs the
 * process not to be a group leader already; if it is a session leader
 * already, that is accepted.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define NAME "fsstate-xyz"

static char top[] = "/tmp/fsstate.XXXXXX";
static char work[64];

static void cleanup(void)
{
	if (chdir("/") == 0) {
		rmdir(work);
		rmdir(top);
	}
}

/* Lower the soft limit to `soft` unless that is above the hard limit. */
static void lower_soft(int res, rlim_t soft)
{
	struct rlimit rl;

	getrlimit(res, &rl);
	if (rl.rlim_max != RLIM_INFINITY && soft > rl.rlim_max)
		soft = rl.rlim_max;
	rl.rlim_cur = soft;
	if (setrlimit(res, &rl))
		fail("setrlimit(%d, soft %lu): %m", res, (unsigned long)soft);
}

int main(int argc, char **argv)
{
	struct rlimit rl0[RLIM_NLIMITS], rl;
	char cwd[PATH_MAX], name[17] = { 0 };
	struct stat cwd_st, st;
	pid_t me = getpid();
	mode_t mask;

	test_init(argc, argv);

	if (setsid() < 0 && !(errno == EPERM && getsid(0) == me))
		fail("setsid: %m (start this test as a non-group-leader)");

	if (!mkdtemp(top))
		fail("mkdtemp: %m");
	snprintf(work, sizeof(work), "%s/work", top);
	atexit(cleanup);
	if (mkdir(work, 0755) || chdir(work))
		fail("mkdir/chdir %s: %m", work);
	stat(".", &cwd_st);

	umask(027);

	lower_soft(RLIMIT_NOFILE, 512);
	lower_soft(RLIMIT_CORE, 0);
	lower_soft(RLIMIT_STACK, 4 << 20);
	getrlimit(RLIMIT_NPROC, &rl);	/* lower a hard limit too */
	rl.rlim_max = (rl.rlim_max == RLIM_INFINITY || rl.rlim_max > 50000) ? 50000
								     : rl.rlim_max - 1;
	if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > rl.rlim_max)
		rl.rlim_cur = rl.rlim_max;
	if (setrlimit(RLIMIT_NPROC, &rl))
		fail("setrlimit(RLIMIT_NPROC hard %lu): %m", (unsigned long)rl.rlim_max);
	for (int r = 0; r < RLIM_NLIMITS; r++)
		getrlimit(r, &rl0[r]);
	if (rl0[RLIMIT_NOFILE].rlim_cur > 512 || rl0[RLIMIT_CORE].rlim_cur != 0)
		fail("setup: rlimits were not lowered");

	if (prctl(PR_SET_NAME, NAME))
		fail("PR_SET_NAME: %m");

	test_ready();
	test_waitsig();

	if (getsid(0) != me)
		fail("getsid(0) = %d, expected own pid %d", (int)getsid(0), (int)me);
	if (getpgrp() != me)
		fail("getpgrp() = %d, expected own pid %d", (int)getpgrp(), (int)me);

	if (!getcwd(cwd, sizeof(cwd)))
		fail("getcwd: %m");
	if (strcmp(cwd, work))
		fail("cwd '%s', expected '%s'", cwd, work);
	if (stat(".", &st) || st.st_ino != cwd_st.st_ino || st.st_dev != cwd_st.st_dev)
		fail("'.' is inode %lu, expected %lu", (unsigned long)st.st_ino,
		     (unsigned long)cwd_st.st_ino);

	mask = umask(0);
	umask(mask);
	if (mask != 027)
		fail("umask %03o, expected 027", (unsigned)mask);

	for (int r = 0; r < RLIM_NLIMITS; r++) {
		getrlimit(r, &rl);
		if (rl.rlim_cur != rl0[r].rlim_cur || rl.rlim_max != rl0[r].rlim_max)
			fail("rlimit %d: soft/hard %lu/%lu, expected %lu/%lu "
			     "(RLIM_INFINITY = %lu)", r, (unsigned long)rl.rlim_cur,
			     (unsigned long)rl.rlim_max, (unsigned long)rl0[r].rlim_cur,
			     (unsigned long)rl0[r].rlim_max, (unsigned long)RLIM_INFINITY);
	}

	if (prctl(PR_GET_NAME, name))
		fail("PR_GET_NAME: %m");
	if (strcmp(name, NAME))
		fail("comm '%s', expected '" NAME "'", name);
	pass();
}
