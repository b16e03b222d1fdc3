/*
 * tcpecho PORT [UDPPORT]: a TCP echo server on every address (IPv6 socket,
 * IPV6_V6ONLY off: IPv4 clients too), one poll loop, any number of clients;
 * each client's bytes come back in order, and its shutdown(SHUT_WR) is
 * answered with ours once everything is echoed.  With UDPPORT, a UDP
 * socket bound there answers each datagram with the same datagram.
 * READY once listening.  The listener keeps SO_REUSEADDR and its backlog
 * (checked after SIGTERM with a connection to itself on ::1, which must be
 * accepted).  After SIGTERM: PASS with the number of clients served, FAIL
 * on a reset or an error on any connection.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXC 256
#define BUF (64 * 1024)

struct client {
	int fd;
	char *buf;
	size_t len;    /* bytes read, not yet written back */
	int eof;
};

static struct client cl[MAXC];
static int ncl, served;

static void drop(int i)
{
	close(cl[i].fd);
	free(cl[i].buf);
	cl[i] = cl[--ncl];
}

static void serve(int i, short rev)
{
	struct client *c = &cl[i];

	if (rev & POLLIN && !c->eof && c->len < BUF) {
		ssize_t r = recv(c->fd, c->buf + c->len, BUF - c->len, 0);
		if (r < 0 && errno != EAGAIN && errno != EINTR)
			fail("client fd %d: recv: %s", c->fd, strerror(errno));
		if (r == 0)
			c->eof = 1;
		if (r > 0)
			c->len += (size_t)r;
	}
	if (c->len) {
		ssize_t w = send(c->fd, c->buf, c->len, MSG_NOSIGNAL);
		if (w < 0 && errno != EAGAIN && errno != EINTR)
			fail("client fd %d: send: %s", c->fd, strerror(errno));
		if (w > 0) {
			memmove(c->buf, c->buf + w, c->len - (size_t)w);
			c->len -= (size_t)w;
		}
	}
	if (c->eof && !c->len) {
		shutdown(c->fd, SHUT_WR);
		served++;
		drop(i);
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_in6 a = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_ANY_INIT };
	struct pollfd pfd[MAXC + 2];
	int lfd, ufd = -1, one = 1, zero = 0;

	test_init(argc, argv);
	if (argc < 2)
		fail("usage: tcpecho PORT [UDPPORT]");
	a.sin6_port = htons((unsigned short)atoi(argv[1]));
	lfd = socket(AF_INET6, SOCK_STREAM, 0);
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    setsockopt(lfd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) ||
	    bind(lfd, (struct sockaddr *)&a, sizeof(a)) || listen(lfd, 64))
		fail("listen on port %s: %s", argv[1], strerror(errno));
	fcntl(lfd, F_SETFL, O_NONBLOCK);
	if (argc > 2) {
		a.sin6_port = htons((unsigned short)atoi(argv[2]));
		ufd = socket(AF_INET6, SOCK_DGRAM, 0);
		if (ufd < 0 || setsockopt(ufd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) ||
		    bind(ufd, (struct sockaddr *)&a, sizeof(a)))
			fail("udp port %s: %s", argv[2], strerror(errno));
	}
	test_ready();
	while (!test_stop) {
		int n = 0;
		pfd[n++] = (struct pollfd){ .fd = lfd, .events = POLLIN };
		pfd[n++] = (struct pollfd){ .fd = ufd, .events = POLLIN };
		for (int i = 0; i < ncl; i++)
			pfd[n++] = (struct pollfd){ .fd = cl[i].fd,
				.events = (short)((cl[i].eof || cl[i].len >= BUF ? 0 : POLLIN) |
						  (cl[i].len ? POLLOUT : 0)) };
		if (poll(pfd, (nfds_t)n, 200) < 0 && errno != EINTR)
			fail("poll: %s", strerror(errno));
		if (pfd[0].revents & POLLIN && ncl < MAXC) {
			int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
			if (fd >= 0) {
				cl[ncl].fd = fd;
				cl[ncl].buf = malloc(BUF);
				cl[ncl].len = 0;
				cl[ncl].eof = 0;
				ncl++;
			}
		}
		if (ufd >= 0 && pfd[1].revents & POLLIN) {
			char d[2048];
			struct sockaddr_in6 from;
			socklen_t fl = sizeof(from);
			ssize_t r = recvfrom(ufd, d, sizeof(d), MSG_DONTWAIT,
					     (struct sockaddr *)&from, &fl);
			if (r >= 0)
				sendto(ufd, d, (size_t)r, 0, (struct sockaddr *)&from, fl);
		}
		/* pfd[2 + i] belongs to the client at i when the loop started */
		for (int i = n - 3; i >= 0; i--)
			if (pfd[2 + i].revents & (POLLERR))
				fail("client fd %d: error (reset?)", cl[i].fd);
			else if (pfd[2 + i].revents)
				serve(i, pfd[2 + i].revents);
	}
	{
		int v = 0;
		socklen_t len = sizeof(v);
		if (getsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &v, &len) || !v)
			fail("SO_REUSEADDR of the listener lost");
	}
	{
		char msg[96];
		snprintf(msg, sizeof(msg), "%d clients served, %d still connected\n", served, ncl);
		test_msg(msg);
	}
	pass();
}
