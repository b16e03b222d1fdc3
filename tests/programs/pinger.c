/*
 * pinger ADDR PORT [INTERVAL_US]: a client of memservice that sends a
 * request every INTERVAL_US microseconds (default 1000) on one connection
 * and reads the answers, which must come back in order.  It measures the
 * longest gap between two answers: the downtime a client of a migrated
 * service sees.  Prints "GAP max_ms=... at=..." lines as the gap record
 * grows.  READY after the first answer.  After SIGTERM: PASS with the
 * counts and the longest gap; FAIL on a connection error, a reset, or an
 * answer out of order.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#define STALLED_S 5.0

int main(int argc, char **argv)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICHOST };
	struct addrinfo *ai;
	uint64_t sent = 0, got = 0;
	unsigned char in[16];
	size_t have = 0;
	double interval, t_next, t_last = 0, max_gap = 0, t_max = 0, t0;
	int fd, one = 1, ready = 0;
	char msg[200];

	test_init(argc, argv);
	if (argc < 3)
		fail("usage: pinger ADDR PORT [INTERVAL_US]");
	interval = (argc > 3 ? atof(argv[3]) : 1000.0) / 1e6;
	if (getaddrinfo(argv[1], argv[2], &hints, &ai))
		fail("getaddrinfo %s", argv[1]);
	fd = socket(ai->ai_family, SOCK_STREAM, 0);
	if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen))
		fail("connect to %s port %s: %s", argv[1], argv[2], strerror(errno));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	t0 = t_next = now();
	while (!test_stop) {
		double t = now();
		if (t >= t_next) {
			uint64_t req[2] = { sent, sent * 7919 };
			if (send(fd, req, sizeof(req), MSG_NOSIGNAL | MSG_DONTWAIT) == sizeof(req))
				sent++;
			else if (errno != EAGAIN && errno != EINTR)
				fail("send after %llu requests: %s", (unsigned long long)sent,
				     strerror(errno));
			t_next += interval;
			if (t_next < t)
				t_next = t + interval;
		}
		/* ppoll: the wait is under a millisecond (poll's unit) */
		double wait = t_next - now();
		struct timespec to = { 0, 0 };
		if (wait > 0) {
			to.tv_sec = (time_t)wait;
			to.tv_nsec = (long)((wait - (double)to.tv_sec) * 1e9);
		}
		struct pollfd p = { .fd = fd, .events = POLLIN };
		if (ppoll(&p, 1, &to, NULL) < 0 && errno != EINTR)
			fail("ppoll: %s", strerror(errno));
		for (;;) {
			ssize_t r = recv(fd, in + have, sizeof(in) - have, MSG_DONTWAIT);
			if (r < 0 && (errno == EAGAIN || errno == EINTR))
				break;
			if (r < 0)
				fail("recv after %llu answers: %s", (unsigned long long)got,
				     strerror(errno));
			if (r == 0)
				fail("the service closed the connection after %llu answers",
				     (unsigned long long)got);
			have += (size_t)r;
			if (have < sizeof(in))
				continue;
			uint64_t seq;
			memcpy(&seq, in, 8);
			have = 0;
			if (seq != got)
				fail("answer %llu came for request %llu", (unsigned long long)got,
				     (unsigned long long)seq);
			got++;
			t = now();
			if (t_last && t - t_last > 0.05) {
				/* every long wait, for a bench to pick its own */
				snprintf(msg, sizeof(msg), "WAIT ms=%.1f at=%.3f\n",
					 (t - t_last) * 1e3, t - t0);
				test_msg(msg);
			}
			if (t_last && t - t_last > max_gap) {
				max_gap = t - t_last;
				t_max = t - t0;
				if (max_gap > 0.01) {
					snprintf(msg, sizeof(msg), "GAP max_ms=%.1f at=%.3f\n",
						 max_gap * 1e3, t_max);
					test_msg(msg);
				}
			}
			t_last = t;
			if (!ready) {
				ready = 1;
				test_ready();
			}
		}
	}
	/* A clean end: no more requests (FIN), then the answers still coming
	 * read until the service closes too.  Closing with an answer unread
	 * would reset the connection, and the service would take that for a
	 * failure of its own. */
	double t_stop = now();
	shutdown(fd, SHUT_WR);
	{
		double t_end = now() + 5.0;
		unsigned char sink[4096];
		struct pollfd p = { .fd = fd, .events = POLLIN };
		while (now() < t_end && poll(&p, 1, 100) >= 0) {
			if (p.revents) {
				ssize_t r = recv(fd, sink, sizeof(sink), MSG_DONTWAIT);
				if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
					break;
			}
		}
	}
	snprintf(msg, sizeof(msg), "%llu requests, %llu answers, longest gap %.1f ms at %.3f s\n",
		 (unsigned long long)sent, (unsigned long long)got, max_gap * 1e3, t_max);
	test_msg(msg);
	/* a service that stopped answering for good shows no long gap: the
	 * gap is only measured when an answer comes */
	if (t_stop - (t_last ? t_last : t0) > STALLED_S)
		fail("no answer for the last %.1f s (%llu requests unanswered)",
		     t_stop - (t_last ? t_last : t0), (unsigned long long)(sent - got));
	pass();
}
