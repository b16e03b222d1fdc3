/*
 * tcpstream ADDR PORT [NCONN [WINDOW]]: NCONN (default 1) TCP connections to an echo
 * server, each streaming numbered bytes (byte i of a connection is
 * (i * 7 + i / 251 + conn) % 256) and checking every byte echoed back, in
 * order.  Up to WINDOW bytes (default 256 KiB) per connection are in flight, so both queues of
 * each connection hold data whenever the program is dumped.  Options set
 * on every socket: TCP_NODELAY, SO_KEEPALIVE with TCP_KEEPIDLE 77.
 * READY once every connection has echoed its first bytes.
 * After SIGTERM: stops sending, reads back everything still in flight,
 * checks the options are still set, shuts its writes down and expects EOF
 * from the server.  PASS with the byte counts; FAIL on a wrong, missing or
 * extra byte, a reset, or a lost option.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXCONN 128
static unsigned long long WINDOW = 256 * 1024;

struct conn {
	int fd;
	unsigned long long sent, got;
	int done;
};

static unsigned char byte_at(unsigned long long i, int c)
{
	return (unsigned char)((i * 7 + i / 251 + (unsigned)c) % 256);
}

static int connect_to(const char *addr, const char *port)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST };
	struct addrinfo *ai;
	int fd, one = 1, idle = 77;

	if (getaddrinfo(addr, port, &hints, &ai))
		fail("getaddrinfo %s", addr);
	fd = socket(ai->ai_family, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen))
		fail("connect to %s port %s: %s", addr, port, strerror(errno));
	freeaddrinfo(ai);
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) ||
	    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) ||
	    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)))
		fail("setsockopt: %s", strerror(errno));
	fcntl(fd, F_SETFL, O_NONBLOCK);
	return fd;
}

static void pump_out(struct conn *c, int i)
{
	unsigned char buf[16384];
	while (c->sent - c->got < WINDOW) {
		size_t n = sizeof(buf);
		if (n > WINDOW - (c->sent - c->got))
			n = (size_t)(WINDOW - (c->sent - c->got));
		for (size_t k = 0; k < n; k++)
			buf[k] = byte_at(c->sent + k, i);
		ssize_t w = send(c->fd, buf, n, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			fail("conn %d: send after %llu bytes: %s", i, c->sent, strerror(errno));
		}
		c->sent += (unsigned long long)w;
	}
}

static int pump_in(struct conn *c, int i)
{
	unsigned char buf[16384];
	for (;;) {
		ssize_t r = recv(c->fd, buf, sizeof(buf), 0);
		if (r < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return 0;
			fail("conn %d: recv after %llu bytes: %s", i, c->got, strerror(errno));
		}
		if (r == 0)
			return 1;
		for (ssize_t k = 0; k < r; k++) {
			if (buf[k] != byte_at(c->got + (unsigned long long)k, i))
				fail("conn %d: byte %llu is %u, expected %u", i,
				     c->got + (unsigned long long)k, buf[k],
				     byte_at(c->got + (unsigned long long)k, i));
		}
		c->got += (unsigned long long)r;
		if (c->got > c->sent)
			fail("conn %d: %llu bytes echoed, only %llu sent", i, c->got, c->sent);
	}
}

int main(int argc, char **argv)
{
	static struct conn conns[MAXCONN];
	struct pollfd pfd[MAXCONN];
	int n = argc > 3 ? atoi(argv[3]) : 1, ready = 0;
	unsigned long long total = 0;

	test_init(argc, argv);
	if (argc > 4)
		WINDOW = strtoull(argv[4], NULL, 0);
	if (argc < 3 || n < 1 || n > MAXCONN)
		fail("usage: tcpstream ADDR PORT [NCONN]");
	for (int i = 0; i < n; i++)
		conns[i].fd = connect_to(argv[1], argv[2]);
	while (!test_stop) {
		for (int i = 0; i < n; i++) {
			pfd[i].fd = conns[i].fd;
			pfd[i].events = POLLIN | (conns[i].sent - conns[i].got < WINDOW ? POLLOUT : 0);
		}
		if (poll(pfd, (nfds_t)n, 200) < 0 && errno != EINTR)
			fail("poll: %s", strerror(errno));
		for (int i = 0; i < n; i++) {
			if (pfd[i].revents & (POLLERR | POLLHUP))
				fail("conn %d: error or hang-up after %llu bytes (revents %#x)", i,
				     conns[i].got, pfd[i].revents);
			if (pump_in(&conns[i], i))
				fail("conn %d: EOF from the server after %llu bytes", i, conns[i].got);
			pump_out(&conns[i], i);
		}
		if (!ready) {
			int all = 1;
			for (int i = 0; i < n; i++)
				all &= conns[i].got > 0;
			if (all) {
				ready = 1;
				test_ready();
			}
		}
	}
	/* Drain: every byte sent comes back, then EOF after our shutdown. */
	for (int i = 0; i < n; i++) {
		struct conn *c = &conns[i];
		int v = 0;
		socklen_t len = sizeof(v);

		if (getsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &v, &len) || !v)
			fail("conn %d: TCP_NODELAY lost", i);
		if (getsockopt(c->fd, SOL_SOCKET, SO_KEEPALIVE, &v, &len) || !v)
			fail("conn %d: SO_KEEPALIVE lost", i);
		if (getsockopt(c->fd, IPPROTO_TCP, TCP_KEEPIDLE, &v, &len) || v != 77)
			fail("conn %d: TCP_KEEPIDLE is %d, not 77", i, v);
		fcntl(c->fd, F_SETFL, 0);
		if (shutdown(c->fd, SHUT_WR))
			fail("conn %d: shutdown: %s", i, strerror(errno));
		fcntl(c->fd, F_SETFL, O_NONBLOCK);
		while (!c->done) {
			struct pollfd p = { .fd = c->fd, .events = POLLIN };
			if (poll(&p, 1, 60000) <= 0)
				fail("conn %d: nothing for 60 s, %llu of %llu bytes back", i, c->got,
				     c->sent);
			c->done = pump_in(c, i);
		}
		if (c->got != c->sent)
			fail("conn %d: EOF after %llu of %llu bytes", i, c->got, c->sent);
		total += c->got;
	}
	{
		char msg[128];
		snprintf(msg, sizeof(msg), "%d connections, %llu bytes echoed and checked\n", n,
			 total);
		test_msg(msg);
	}
	pass();
}
