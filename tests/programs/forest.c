/*
 * forest [NPROC [NTHREADS]]: NPROC processes (default 50: the root and its
 * descendants, each process forking up to 3 children) with NTHREADS
 * threads each (default 4: the main one and 3 that tick counters, some in
 * futex waits) and 10 fds of mixed kinds each: a regular file (own
 * offset), a directory, /dev/null, a pipe (both ends, data in flight), an
 * eventfd, a timerfd, an epoll watching the pipe, a unix socketpair (both
 * ends, data queued).
 * After SIGTERM (passed down the tree) every process checks its fds, its
 * data in flight, and that its threads still run; each parent checks its
 * children's exit status; the root prints the verdict.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_KIDS 3
#define FD0 20            /* fds FD0 .. FD0+9 */

static int index_;         /* this process's number in the tree */
static volatile uint64_t ticks[16];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int ready_w;

static void *ticker(void *arg)
{
	long i = (long)arg;

	for (;;) {
		ticks[i]++;
		if (i % 2) {       /* a futex wait, woken by the timeout */
			struct timespec ts;

			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += 2000000;
			if (ts.tv_nsec >= 1000000000) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000;
			}
			pthread_mutex_lock(&lock);
			pthread_cond_timedwait(&cond, &lock, &ts);
			pthread_mutex_unlock(&lock);
		} else {
			usleep(1000);
		}
	}
	return NULL;
}

static void place(int fd, int at)
{
	if (fd < 0)
		fail("proc %d: fd for %d: %s", index_, at, strerror(errno));
	if (fd != at) {
		if (dup2(fd, at) < 0)
			fail("proc %d: dup2 %d", index_, at);
		close(fd);
	}
}

static void make_fds(void)
{
	char name[64];
	int p[2], sv[2];
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0xfeed0000u + index_};
	struct itimerspec its = {{100, 0}, {100, 0}};

	snprintf(name, sizeof(name), "forest.%d", index_);
	place(open(name, O_RDWR | O_CREAT | O_TRUNC, 0600), FD0);
	if (write(FD0, "forest", 6) != 6)
		fail("write file");
	place(open(".", O_RDONLY | O_DIRECTORY), FD0 + 1);
	place(open("/dev/null", O_WRONLY), FD0 + 2);
	if (pipe(p))
		fail("pipe");
	place(p[0], FD0 + 3);
	place(p[1], FD0 + 4);
	if (write(FD0 + 4, &index_, sizeof(index_)) != sizeof(index_))
		fail("write pipe");
	place(eventfd(index_ + 1, 0), FD0 + 5);
	place(timerfd_create(CLOCK_MONOTONIC, 0), FD0 + 6);
	if (timerfd_settime(FD0 + 6, 0, &its, NULL))
		fail("timerfd_settime");
	place(epoll_create1(0), FD0 + 7);
	if (epoll_ctl(FD0 + 7, EPOLL_CTL_ADD, FD0 + 3, &ev))
		fail("epoll_ctl");
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		fail("socketpair");
	place(sv[0], FD0 + 8);
	place(sv[1], FD0 + 9);
	if (send(FD0 + 8, &index_, sizeof(index_), 0) != sizeof(index_))
		fail("send");
}

static void check_fds(void)
{
	struct stat st;
	struct epoll_event ev;
	uint64_t v;
	int x;

	if (lseek(FD0, 0, SEEK_CUR) != 6)
		fail("proc %d: file offset %ld", index_, (long)lseek(FD0, 0, SEEK_CUR));
	if (fstat(FD0 + 1, &st) || !S_ISDIR(st.st_mode))
		fail("proc %d: fd %d is not a directory", index_, FD0 + 1);
	if (fstat(FD0 + 2, &st) || !S_ISCHR(st.st_mode))
		fail("proc %d: fd %d is not /dev/null", index_, FD0 + 2);
	if (epoll_wait(FD0 + 7, &ev, 1, 0) != 1 || ev.data.u64 != 0xfeed0000u + index_)
		fail("proc %d: epoll does not see the pipe", index_);
	if (read(FD0 + 3, &x, sizeof(x)) != sizeof(x) || x != index_)
		fail("proc %d: pipe data", index_);
	if (read(FD0 + 5, &v, sizeof(v)) != sizeof(v) || v != (uint64_t)index_ + 1)
		fail("proc %d: eventfd count %lu", index_, (unsigned long)v);
	{
		struct itimerspec its;

		if (timerfd_gettime(FD0 + 6, &its) || its.it_interval.tv_sec != 100)
			fail("proc %d: timerfd interval", index_);
	}
	if (recv(FD0 + 9, &x, sizeof(x), MSG_DONTWAIT) != sizeof(x) || x != index_)
		fail("proc %d: socket data", index_);
}

static void run(int nproc, int nthreads, int first, int count) __attribute__((noreturn));

/* This process is number `first`; it has `count` processes in its subtree. */
static void run(int nproc, int nthreads, int first, int count)
{
	pid_t kids[MAX_KIDS];
	int nkids = 0, next = first + 1, left = count - 1;
	uint64_t before[16];

	index_ = first;
	for (int k = 0; k < MAX_KIDS && left > 0; k++) {
		int share = (left + (MAX_KIDS - k) - 1) / (MAX_KIDS - k);
		pid_t c = fork();

		if (c < 0)
			fail("fork");
		if (c == 0)
			run(nproc, nthreads, next, share);
		kids[nkids++] = c;
		next += share;
		left -= share;
	}
	make_fds();
	for (long i = 1; i < nthreads && i < 16; i++) {
		pthread_t t;

		if (pthread_create(&t, NULL, ticker, (void *)i))
			fail("pthread_create");
	}
	if (write(ready_w, "x", 1) != 1)
		fail("ready pipe");
	close(ready_w);
	test_waitsig();
	for (int i = 0; i < nkids; i++)
		kill(kids[i], SIGTERM);
	for (int i = 1; i < nthreads && i < 16; i++)
		before[i] = ticks[i];
	check_fds();
	usleep(50000);
	for (int i = 1; i < nthreads && i < 16; i++)
		if (ticks[i] == before[i])
			fail("proc %d: thread %d stopped ticking", index_, i);
	for (int i = 0; i < nkids; i++) {
		int st;

		if (waitpid(kids[i], &st, 0) != kids[i] || !WIFEXITED(st) || WEXITSTATUS(st))
			fail("proc %d: child %d ended with status %#x", index_, kids[i], st);
	}
	if (first == 0)
		pass();
	_exit(0);
}

int main(int argc, char **argv)
{
	int nproc = argc > 1 ? atoi(argv[1]) : 50;
	int nthreads = argc > 2 ? atoi(argv[2]) : 4;
	int p[2];
	char c;
	pid_t root = getpid();

	test_init(argc, argv);
	if (pipe(p))
		fail("ready pipe");
	ready_w = p[1];
	if (fork() == 0) {
		/* a watcher: reports READY once every process is set up */
		close(ready_w);
		for (int n = 0; n < nproc; n++)
			if (read(p[0], &c, 1) != 1)
				_exit(1);
		test_ready();
		_exit(0);
	}
	close(p[0]);
	(void)root;
	run(nproc, nthreads, 0, nproc);
}
