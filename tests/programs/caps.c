/*
 * caps: a process that dropped root but kept some capabilities, with the
 * per-process prctl attributes around credentials:
 *  - uid/gid 1000/1100, bounding set without CAP_SYS_BOOT and CAP_MKNOD,
 *    effective {NET_BIND_SERVICE, KILL}, permitted + CHOWN, inheritable
 *    {NET_BIND_SERVICE, CHOWN}, ambient {NET_BIND_SERVICE},
 *  - securebits KEEP_CAPS | NO_SETUID_FIXUP | NO_CAP_AMBIENT_RAISE,
 *  - no_new_privs, dumpable set back to 1 after the uid change,
 *  - pdeath_sig SIGUSR2 (must never arrive: the parent stays alive),
 *  - timer slack, child subreaper, THP disabled except advised, MDWE,
 *    personality ADDR_NO_RANDOMIZE.
 * After SIGTERM every one of them must be as set.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <grp.h>
#include <linux/capability.h>
#include <linux/securebits.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef PR_SET_MDWE
#define PR_SET_MDWE 65
#define PR_GET_MDWE 66
#define PR_MDWE_REFUSE_EXEC_GAIN 1
#endif
#define PR_THP_DISABLE_EXCEPT_ADVISED (1 << 1)
#define BIT(c) (1ULL << (c))
#define SLACK 123457

static volatile int usr2_seen;

static void on_usr2(int sig)
{
	(void)sig;
	usr2_seen++;
}

static void capset3(uint64_t eff, uint64_t prm, uint64_t inh)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2] = {
		{ (uint32_t)eff, (uint32_t)prm, (uint32_t)inh },
		{ (uint32_t)(eff >> 32), (uint32_t)(prm >> 32), (uint32_t)(inh >> 32) },
	};

	if (syscall(SYS_capset, &h, d))
		fail("capset(eff %#llx, prm %#llx, inh %#llx): %s", (unsigned long long)eff,
		     (unsigned long long)prm, (unsigned long long)inh, strerror(errno));
}

static void capget3(uint64_t *eff, uint64_t *prm, uint64_t *inh)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2];

	if (syscall(SYS_capget, &h, d))
		fail("capget");
	*eff = d[0].effective | (uint64_t)d[1].effective << 32;
	*prm = d[0].permitted | (uint64_t)d[1].permitted << 32;
	*inh = d[0].inheritable | (uint64_t)d[1].inheritable << 32;
}

int main(int argc, char **argv)
{
	const uint64_t eff = BIT(CAP_NET_BIND_SERVICE) | BIT(CAP_KILL);
	const uint64_t prm = eff | BIT(CAP_CHOWN);
	const uint64_t inh = BIT(CAP_NET_BIND_SERVICE) | BIT(CAP_CHOWN);
	const int bits = SECBIT_KEEP_CAPS | SECBIT_NO_SETUID_FIXUP | SECBIT_NO_CAP_AMBIENT_RAISE;
	uint64_t e, p, i;
	uid_t r, eu, s;
	int sig = 0, v = 0, c;

	test_init(argc, argv);
	signal(SIGUSR2, on_usr2);
	if (personality(ADDR_NO_RANDOMIZE) < 0)
		fail("personality");
	if (prctl(PR_CAPBSET_DROP, CAP_SYS_BOOT, 0, 0, 0) ||
	    prctl(PR_CAPBSET_DROP, CAP_MKNOD, 0, 0, 0))
		fail("PR_CAPBSET_DROP");
	if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0))
		fail("PR_SET_KEEPCAPS");
	if (setgroups(0, NULL) || setresgid(1100, 1100, 1100) || setresuid(1000, 1000, 1000))
		fail("dropping root");
	capset3(prm | BIT(CAP_SETPCAP), prm | BIT(CAP_SETPCAP), inh);
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0))
		fail("PR_CAP_AMBIENT_RAISE: %s", strerror(errno));
	if (prctl(PR_SET_SECUREBITS, bits, 0, 0, 0))
		fail("PR_SET_SECUREBITS: %s", strerror(errno));
	capset3(eff, prm, inh);
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) ||
	    prctl(PR_SET_PDEATHSIG, SIGUSR2, 0, 0, 0) ||
	    prctl(PR_SET_TIMERSLACK, SLACK, 0, 0, 0) ||
	    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) ||
	    prctl(PR_SET_THP_DISABLE, 1, PR_THP_DISABLE_EXCEPT_ADVISED, 0, 0) ||
	    prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0))
		fail("prctl: %s", strerror(errno));
	test_ready();
	test_waitsig();

	getresuid(&r, &eu, &s);
	if (r != 1000 || eu != 1000 || s != 1000 || getgid() != 1100 || getegid() != 1100)
		fail("uid %d/%d/%d gid %d", r, eu, s, getgid());
	capget3(&e, &p, &i);
	if (e != eff || p != prm || i != inh)
		fail("caps eff %#llx prm %#llx inh %#llx, expected %#llx %#llx %#llx",
		     (unsigned long long)e, (unsigned long long)p, (unsigned long long)i,
		     (unsigned long long)eff, (unsigned long long)prm, (unsigned long long)inh);
	for (c = 0; c <= CAP_LAST_CAP; c++) {
		int amb = prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_IS_SET, c, 0, 0);
		int bnd = prctl(PR_CAPBSET_READ, c, 0, 0, 0);

		if (amb != (c == CAP_NET_BIND_SERVICE))
			fail("ambient cap %d is %d", c, amb);
		/* CAP_SYS_RESOURCE: this machine's tools never have it */
		if (c != CAP_SYS_RESOURCE && bnd != (c != CAP_SYS_BOOT && c != CAP_MKNOD))
			fail("bounding cap %d is %d", c, bnd);
	}
	if ((c = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)) != bits)
		fail("securebits %#x, expected %#x", c, bits);
	if (prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1)
		fail("no_new_privs lost");
	if ((c = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)) != 1)
		fail("dumpable %d, expected 1", c);
	if (prctl(PR_GET_PDEATHSIG, &sig, 0, 0, 0) || sig != SIGUSR2)
		fail("pdeath_sig %d, expected %d", sig, SIGUSR2);
	if (usr2_seen)
		fail("the pdeath signal arrived %d times: the parent is alive", usr2_seen);
	if ((c = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)) != SLACK)
		fail("timer slack %d, expected %d", c, SLACK);
	if (prctl(PR_GET_CHILD_SUBREAPER, &v, 0, 0, 0) || v != 1)
		fail("child subreaper %d", v);
	if ((c = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0)) != (1 | PR_THP_DISABLE_EXCEPT_ADVISED))
		fail("THP disable %d, expected %d", c, 1 | PR_THP_DISABLE_EXCEPT_ADVISED);
	if ((c = prctl(PR_GET_MDWE, 0, 0, 0, 0)) != PR_MDWE_REFUSE_EXEC_GAIN)
		fail("MDWE %d", c);
	if ((c = personality(0xffffffff)) != ADDR_NO_RANDOMIZE)
		fail("personality %#x", c);
	pass();
}
