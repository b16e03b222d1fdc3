/*
 * creds: a process that dropped root: supplementary groups, real/effective/
 * saved gids and uids all different, fsuid/fsgid the saved ones rather than
 * the effective ones, no_new_privs set, dumpable cleared by
 * the uid change; after SIGTERM all of them must be as before.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <grp.h>
#include <sys/fsuid.h>
#include <sys/prctl.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	gid_t groups[] = { 1234, 2345, 3456 }, got[16];
	uid_t r, e, s;
	gid_t gr, ge, gs;
	int n;

	test_init(argc, argv);
	if (setgroups(3, groups) || setresgid(1100, 1101, 1102) || setresuid(1000, 1001, 1002))
		fail("dropping root");
	/* fs ids other than the effective ones (allowed: they are saved ids) */
	setfsgid(1102);
	setfsuid(1002);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		fail("PR_SET_NO_NEW_PRIVS");
	test_ready();
	test_waitsig();
	getresuid(&r, &e, &s);
	if (r != 1000 || e != 1001 || s != 1002)
		fail("uids %d/%d/%d, expected 1000/1001/1002", r, e, s);
	getresgid(&gr, &ge, &gs);
	if (gr != 1100 || ge != 1101 || gs != 1102)
		fail("gids %d/%d/%d, expected 1100/1101/1102", gr, ge, gs);
	if ((n = setfsuid(-1)) != 1002)
		fail("fsuid %d, expected 1002", n);
	if ((n = setfsgid(-1)) != 1102)
		fail("fsgid %d, expected 1102", n);
	n = getgroups(16, got);
	if (n != 3 || got[0] != 1234 || got[1] != 2345 || got[2] != 3456)
		fail("%d supplementary groups, expected 1234 2345 3456", n);
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		fail("no_new_privs lost");
	if (prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0)
		fail("dumpable is %d, expected 0 after the uid change",
		     prctl(PR_GET_DUMPABLE, 0, 0, 0, 0));
	pass();
}
