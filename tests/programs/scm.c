/*
 * scm: file descriptors in flight (SCM_RIGHTS) in unix socket queues.
 *   stream pair 60/61: "files" sent on 61 with [a regular file at offset 3,
 *       the read end of a pipe whose write end is fd 65 ("in-pipe" in
 *       flight)]; the sender's copies closed: they live only in the queue
 *   datagram pair 62/63: "one" with [an eventfd, count 7], "two" alone,
 *       "three" with [one end of a socketpair whose other end is fd 64]
 * After SIGTERM: every message with its files, each file as it was (offset,
 * content, pipe data, counter) and connected to what it was.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

static void send_fds(int s, const char *data, int *fds, int n)
{
	char cbuf[CMSG_SPACE(4 * sizeof(int))];
	struct iovec iov = {.iov_base = (void *)data, .iov_len = strlen(data)};
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};

	if (n) {
		struct cmsghdr *c;

		memset(cbuf, 0, sizeof(cbuf));
		m.msg_control = cbuf;
		m.msg_controllen = CMSG_SPACE(n * sizeof(int));
		c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(n * sizeof(int));
		memcpy(CMSG_DATA(c), fds, n * sizeof(int));
	}
	if (sendmsg(s, &m, 0) != (ssize_t)strlen(data))
		fail("sendmsg '%s': %s", data, strerror(errno));
}

/* Receive one message; its fds in fds[], their number returned. */
static int recv_fds(int s, const char *want, int *fds)
{
	char buf[64], cbuf[CMSG_SPACE(4 * sizeof(int))];
	struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf)};
	struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			   .msg_controllen = sizeof(cbuf)};
	ssize_t n = recvmsg(s, &m, MSG_DONTWAIT);
	struct cmsghdr *c;
	int nfds = 0;

	if (n != (ssize_t)strlen(want) || memcmp(buf, want, n))
		fail("fd %d: got %zd bytes '%.*s', expected '%s'", s, n, (int)(n > 0 ? n : 0), buf,
		     want);
	for (c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
			nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			memcpy(fds, CMSG_DATA(c), nfds * sizeof(int));
		}
	return nfds;
}

int main(int argc, char **argv)
{
	int sp[2], dp[2], q[2], p[2], fds[4], f, e;
	char buf[32];
	uint64_t v;

	test_init(argc, argv);
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) || dup2(sp[0], 60) < 0 || dup2(sp[1], 61) < 0)
		fail("stream pair");
	close(sp[0]);
	close(sp[1]);
	if (socketpair(AF_UNIX, SOCK_DGRAM, 0, dp) || dup2(dp[0], 62) < 0 || dup2(dp[1], 63) < 0)
		fail("dgram pair");
	close(dp[0]);
	close(dp[1]);

	f = open("scm.data", O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (f < 0 || write(f, "0123456789", 10) != 10 || lseek(f, 3, SEEK_SET) != 3)
		fail("data file");
	if (pipe(p) || dup2(p[1], 65) < 0 || write(65, "in-pipe", 7) != 7)
		fail("pipe");
	close(p[1]);
	fds[0] = f;
	fds[1] = p[0];
	send_fds(61, "files", fds, 2);
	close(f);
	close(p[0]);

	e = eventfd(7, 0);
	send_fds(63, "one", &e, 1);
	close(e);
	send_fds(63, "two", NULL, 0);
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, q) || dup2(q[1], 64) < 0)
		fail("q pair");
	close(q[1]);
	send_fds(63, "three", &q[0], 1);
	close(q[0]);

	test_ready();
	test_waitsig();

	if (recv_fds(60, "files", fds) != 2)
		fail("'files' came without its 2 fds");
	if (lseek(fds[0], 0, SEEK_CUR) != 3 || read(fds[0], buf, 4) != 4 || memcmp(buf, "3456", 4))
		fail("the file in flight lost its offset or content");
	if (read(fds[1], buf, 7) != 7 || memcmp(buf, "in-pipe", 7))
		fail("the pipe in flight lost its data");
	if (write(65, "x", 1) != 1 || read(fds[1], buf, 1) != 1 || buf[0] != 'x')
		fail("fd 65 no longer feeds the pipe in flight");
	if (recv_fds(62, "one", fds) != 1 || read(fds[0], &v, 8) != 8 || v != 7)
		fail("'one': the eventfd in flight");
	if (recv_fds(62, "two", fds) != 0)
		fail("'two' came with fds");
	if (recv_fds(62, "three", fds) != 1)
		fail("'three' came without its socket");
	if (send(fds[0], "via-q", 5, 0) != 5 || recv(64, buf, sizeof(buf), MSG_DONTWAIT) != 5 ||
	    memcmp(buf, "via-q", 5))
		fail("the socket in flight is not connected to fd 64");
	pass();
}
