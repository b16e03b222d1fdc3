/*
 * seccomp: two threads under different chains of seccomp filters.
 *   filter A (both threads): munmap -> EROFS, getitimer -> ENOTTY; a wrong
 *            arch kills.  The dump runs getitimer and munmap in the task and
 *            the restore ends with a munmap: both must get around it.
 *   filter B (second thread only, SECCOMP_FILTER_FLAG_LOG): getppid -> EXDEV
 *   filter C (main thread only, installed after the thread): getuid -> ENOLINK
 * After SIGTERM each thread checks that exactly its filters still act, and
 * /proc says mode 2 with two filters for each.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define NR_AT offsetof(struct seccomp_data, nr)
#define ARCH_AT offsetof(struct seccomp_data, arch)
#define ERR(e) (SECCOMP_RET_ERRNO | (e))

static struct sock_filter filter_a[] = {
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARCH_AT),
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
	BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, NR_AT),
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_munmap, 0, 1),
	BPF_STMT(BPF_RET | BPF_K, ERR(EROFS)),
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getitimer, 0, 1),
	BPF_STMT(BPF_RET | BPF_K, ERR(ENOTTY)),
	BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};

static struct sock_filter filter_b[] = {
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, NR_AT),
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getppid, 0, 1),
	BPF_STMT(BPF_RET | BPF_K, ERR(EXDEV)),
	BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};

static struct sock_filter filter_c[] = {
	BPF_STMT(BPF_LD | BPF_W | BPF_ABS, NR_AT),
	BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getuid, 0, 1),
	BPF_STMT(BPF_RET | BPF_K, ERR(ENOLINK)),
	BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
};

static void install(struct sock_filter *f, unsigned short n, unsigned flags, const char *name)
{
	struct sock_fprog prog = { n, f };

	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog))
		fail("installing filter %s: %s", name, strerror(errno));
}

static void *page;
static volatile int go, thread_ready;
static char thread_verdict[256];
static pid_t thread_tid;

/* "" if syscall nr fails with errno want (or succeeds if want is 0). */
static const char *expect(const char *who, long nr, long a1, long a2, int want)
{
	static __thread char msg[128];
	long r;

	errno = 0;
	r = syscall(nr, a1, a2);
	if (want ? (r != -1 || errno != want) : r == -1) {
		snprintf(msg, sizeof(msg), "%s: syscall %ld returned %ld errno %d, expected %d",
			 who, nr, r, errno, want);
		return msg;
	}
	return "";
}

static int filters_of(pid_t tid)
{
	char path[64], buf[4096], *p;
	FILE *f;
	int n = -1, mode = -1;

	snprintf(path, sizeof(path), "/proc/self/task/%d/status", tid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(buf, sizeof(buf), f)) {
		if ((p = strstr(buf, "Seccomp_filters:")) == buf)
			n = atoi(p + 16);
		else if ((p = strstr(buf, "Seccomp:")) == buf)
			mode = atoi(p + 8);
	}
	fclose(f);
	return mode == 2 ? n : -1;
}

static void *thread_main(void *arg)
{
	struct itimerval itv;
	struct timespec ts = { 0, 5 * 1000 * 1000 };
	const char *m;

	(void)arg;
	thread_tid = gettid();
	install(filter_b, sizeof(filter_b) / sizeof(filter_b[0]), SECCOMP_FILTER_FLAG_LOG, "B");
	thread_ready = 1;
	while (!go)
		nanosleep(&ts, NULL);
	if (*(m = expect("thread getppid", SYS_getppid, 0, 0, EXDEV)) ||
	    *(m = expect("thread getuid", SYS_getuid, 0, 0, 0)) ||
	    *(m = expect("thread munmap", SYS_munmap, (long)page, 4096, EROFS)) ||
	    *(m = expect("thread getitimer", SYS_getitimer, ITIMER_REAL, (long)&itv, ENOTTY)))
		snprintf(thread_verdict, sizeof(thread_verdict), "%s", m);
	else
		snprintf(thread_verdict, sizeof(thread_verdict), "ok");
	return NULL;
}

int main(int argc, char **argv)
{
	struct itimerval itv;
	struct timespec ts = { 0, 5 * 1000 * 1000 };
	pthread_t th;
	const char *m;
	int n;

	test_init(argc, argv);
	page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (page == MAP_FAILED)
		fail("mmap");
	install(filter_a, sizeof(filter_a) / sizeof(filter_a[0]), 0, "A");
	if (pthread_create(&th, NULL, thread_main, NULL))
		fail("pthread_create");
	while (!thread_ready)
		nanosleep(&ts, NULL);
	install(filter_c, sizeof(filter_c) / sizeof(filter_c[0]), 0, "C");
	test_ready();
	test_waitsig();

	if (prctl(PR_GET_SECCOMP, 0, 0, 0, 0) != 2)
		fail("PR_GET_SECCOMP is %d", prctl(PR_GET_SECCOMP, 0, 0, 0, 0));
	if ((n = filters_of(gettid())) != 2)
		fail("main thread: %d filters, expected 2 (A, C)", n);
	if ((n = filters_of(thread_tid)) != 2)
		fail("second thread: %d filters, expected 2 (A, B)", n);
	if (*(m = expect("main getuid", SYS_getuid, 0, 0, ENOLINK)) ||
	    *(m = expect("main getppid", SYS_getppid, 0, 0, 0)) ||
	    *(m = expect("main munmap", SYS_munmap, (long)page, 4096, EROFS)) ||
	    *(m = expect("main getitimer", SYS_getitimer, ITIMER_REAL, (long)&itv, ENOTTY)))
		fail("%s", m);
	go = 1;
	while (!thread_verdict[0])
		nanosleep(&ts, NULL);
	if (strcmp(thread_verdict, "ok"))
		fail("%s", thread_verdict);
	pass();
}
