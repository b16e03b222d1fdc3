/*
 * eventobjs: the kernel's event objects across dumps.
 *   fd 20  eventfd, count 42, EFD_SEMAPHORE | EFD_NONBLOCK
 *   fd 21  signalfd for SIGUSR1 (blocked, one pending)
 *   fd 22  timerfd, CLOCK_MONOTONIC, every 100 ms
 *   fd 23  epoll watching 20 (EPOLLIN|EPOLLET, data 0xdeadbeefcafe) and
 *          22 (EPOLLIN, data 7)
 * After SIGTERM: the semaphore gives exactly 42 ones then EAGAIN; the
 * signalfd reads the pending SIGUSR1; the timer still ticks with its
 * interval; epoll reports both fds with their data.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

static void at(int fd, int want)
{
	if (dup2(fd, want) < 0)
		fail("dup2 %d", want);
	close(fd);
}

int main(int argc, char **argv)
{
	struct itimerspec its = { { 0, 100000000 }, { 0, 100000000 } }, cur;
	struct epoll_event ev, got[4];
	struct signalfd_siginfo si;
	sigset_t m;
	uint64_t v;
	int n, seen_e = 0, seen_t = 0;

	test_init(argc, argv);
	at(eventfd(42, EFD_SEMAPHORE | EFD_NONBLOCK), 20);
	sigemptyset(&m);
	sigaddset(&m, SIGUSR1);
	sigprocmask(SIG_BLOCK, &m, NULL);
	kill(getpid(), SIGUSR1);
	at(signalfd(-1, &m, SFD_NONBLOCK), 21);
	at(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK), 22);
	timerfd_settime(22, 0, &its, NULL);
	at(epoll_create1(0), 23);
	ev.events = EPOLLIN | EPOLLET;
	ev.data.u64 = 0xdeadbeefcafeull;
	if (epoll_ctl(23, EPOLL_CTL_ADD, 20, &ev))
		fail("epoll_ctl eventfd");
	ev.events = EPOLLIN;
	ev.data.u64 = 7;
	if (epoll_ctl(23, EPOLL_CTL_ADD, 22, &ev))
		fail("epoll_ctl timerfd");

	test_ready();
	test_waitsig();

	if (!(fcntl(20, F_GETFL) & O_NONBLOCK))
		fail("eventfd lost O_NONBLOCK");
	for (n = 0; n < 42; n++)
		if (read(20, &v, 8) != 8 || v != 1)
			fail("eventfd semaphore read %d gave %lu (errno %d)", n, (unsigned long)v, errno);
	if (read(20, &v, 8) != -1 || errno != EAGAIN)
		fail("eventfd should be empty after 42 reads");

	if (read(21, &si, sizeof(si)) != sizeof(si) || si.ssi_signo != SIGUSR1)
		fail("signalfd did not read the pending SIGUSR1 (errno %d)", errno);

	if (timerfd_gettime(22, &cur) || cur.it_interval.tv_nsec != 100000000 ||
	    cur.it_interval.tv_sec)
		fail("timerfd interval %ld.%09ld", (long)cur.it_interval.tv_sec,
		     cur.it_interval.tv_nsec);

	for (int tries = 0; tries < 20 && !(seen_e && seen_t); tries++) {
		n = epoll_wait(23, got, 4, 100);
		for (int i = 0; i < n; i++) {
			if (got[i].data.u64 == 0xdeadbeefcafeull) {
				seen_e = 1;
			} else if (got[i].data.u64 == 7) {
				uint64_t ticks;

				seen_t = 1;
				if (read(22, &ticks, 8) != 8 || !ticks)
					fail("timer ticked for epoll but read gave nothing");
			} else {
				fail("epoll returned unknown data %#lx", (unsigned long)got[i].data.u64);
			}
		}
		if (!seen_e) {	/* the semaphore was emptied: make it readable again */
			v = 1;
			if (write(20, &v, 8) != 8)
				fail("eventfd write");
		}
	}
	if (!seen_e || !seen_t)
		fail("epoll did not report eventfd (%d) and timerfd (%d)", seen_e, seen_t);
	pass();
}
