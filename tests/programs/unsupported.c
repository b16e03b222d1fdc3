/*
 * unsupported MODE: a process holding something `migrate dump` refuses
 * (yet), to prove that a refused dump leaves it exactly as it was.
 *   deleted-map  a MAP_PRIVATE mapping of a file that was then unlinked
 *   socket       an AF_NETLINK socket (unix and inet sockets are handled)
 *   timer        a POSIX timer on the CPU clock of another process
 *   lease        a read lease (F_SETLEASE) on a temporary file
 *   pipe         a pipe with data in flight (supported: a control case)
 *   thread       a second thread (supported: a control case)
 *   seccomp-notify  a seccomp filter returning SECCOMP_RET_USER_NOTIF
 * Besides the refused thing it keeps a memory pattern, a handler, a blocked
 * signal with one pending, and vector registers; after SIGTERM all of it,
 * and the refused thing itself, must still be intact.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <time.h>
#include <unistd.h>

#define AREA (1 << 20)
static volatile int usr1_seen;
static char lockpath[] = "/tmp/unsupported-lock.XXXXXX";
static volatile int thread_ticks;

static void on_usr1(int sig) { (void)sig; usr1_seen++; }

static void *spin(void *arg)
{
	(void)arg;
	while (!test_stop) {
		thread_ticks++;
		usleep(1000);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "pipe";
	uint8_t *area, *fmap = NULL;
	int pfd[2] = { -1, -1 };
	pthread_t th;
	sigset_t set;
	struct sigaction sa = { .sa_handler = on_usr1 };

	test_init(argc, argv);
	area = mmap(NULL, AREA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	for (size_t i = 0; i < AREA; i++)
		area[i] = (uint8_t)(i * 7 + 3);
	sigaction(SIGUSR1, &sa, NULL);
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_BLOCK, &set, NULL);
	kill(getpid(), SIGUSR1);	/* pending while blocked */

	if (!strcmp(mode, "deleted-map")) {
		char path[] = "/tmp/unsupported.XXXXXX";
		int fd = mkstemp(path);

		if (fd < 0 || ftruncate(fd, 4096) < 0)
			fail("mkstemp/ftruncate");
		fmap = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
		if (fmap == MAP_FAILED)
			fail("mmap %s", path);
		memcpy(fmap, "deleted but mapped", 19);
		close(fd);
		unlink(path);
	} else if (!strcmp(mode, "pipe")) {
		if (pipe(pfd) || write(pfd[1], "in flight", 9) != 9)
			fail("pipe");
	} else if (!strcmp(mode, "timer")) {
		timer_t t;
		clockid_t clk;
		struct sigevent sev = { .sigev_notify = SIGEV_NONE };
		struct itimerspec its = { { 1000, 0 }, { 1000, 0 } };

		/* On the CPU clock of another process (the parent): nobody can
		 * say which process that would be after a restore. */
		if (clock_getcpuclockid(getppid(), &clk) || timer_create(clk, &sev, &t) ||
		    timer_settime(t, 0, &its, NULL))
			fail("timer_create");
	} else if (!strcmp(mode, "lease")) {
		int fd = mkstemp(lockpath), rfd;

		if (fd < 0)
			fail("mkstemp");
		close(fd);
		rfd = open(lockpath, O_RDONLY);
		if (rfd < 0 || fcntl(rfd, F_SETLEASE, F_RDLCK))
			fail("F_SETLEASE: %s", strerror(errno));
		pfd[0] = -1;
	} else if (!strcmp(mode, "socket")) {
		if ((pfd[0] = socket(AF_NETLINK, SOCK_RAW, 0)) < 0)
			fail("socket");
		pfd[0] = -1;	/* nothing to read back at the end: keep it open */
	} else if (!strcmp(mode, "thread")) {
		if (pthread_create(&th, NULL, spin, NULL))
			fail("pthread_create");
	} else if (!strcmp(mode, "seccomp-notify")) {
		struct sock_filter f[] = {
			BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
			BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getppid, 0, 1),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
			BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		};
		struct sock_fprog prog = { 4, f };
		int nfd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
				  SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);

		if (nfd < 0)
			fail("seccomp(NEW_LISTENER)");
		close(nfd);	/* no supervisor: getppid now fails with ENOSYS */
	} else {
		fail("unknown mode %s", mode);
	}

	test_ready();
	test_waitsig();

	for (size_t i = 0; i < AREA; i++)
		if (area[i] != (uint8_t)(i * 7 + 3))
			fail("area byte %zu at %p changed", i, (void *)&area[i]);
	if (usr1_seen)
		fail("SIGUSR1 was delivered while blocked");
	sigpending(&set);
	if (!sigismember(&set, SIGUSR1))
		fail("pending SIGUSR1 lost");
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	sigprocmask(SIG_UNBLOCK, &set, NULL);
	if (usr1_seen != 1)
		fail("SIGUSR1 handler ran %d times after unblocking, expected 1", usr1_seen);
	if (fmap && memcmp(fmap, "deleted but mapped", 19))
		fail("deleted mapping content changed");
	if (pfd[0] >= 0) {
		char buf[16] = { 0 };

		if (read(pfd[0], buf, sizeof(buf)) != 9 || memcmp(buf, "in flight", 9))
			fail("pipe data lost: '%s'", buf);
	}
	if (!strcmp(mode, "thread")) {
		pthread_join(th, NULL);
		if (!thread_ticks)
			fail("thread never ran");
	}
	if (!strcmp(mode, "lock"))
		unlink(lockpath);
	if (!strcmp(mode, "seccomp-notify") && (syscall(SYS_getppid) != -1 || errno != ENOSYS))
		fail("the seccomp filter no longer acts on getppid");
	pass();
}
