/*
 * memservice PORT MIB [RATE_MB_S]: a service that keeps MIB MiB of state and
 * keeps changing it, RATE_MB_S MB/s of pages rewritten (default 20), while
 * it answers clients over TCP (every address, IPv4 and IPv6).
 * A request is 16 bytes (a sequence number and a page index, both u64); the
 * answer is the sequence number and the page's current version.
 * Every page holds its index and version in its first and last words; a
 * ledger (outside the state) knows every page's version.  READY once all
 * the state is written.  After SIGTERM: every page is checked against the
 * ledger; PASS with the pages rewritten and requests answered, FAIL on a
 * page that does not match, or a connection error.
 */
#define _GNU_SOURCE
#include "lib.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define MAXC 64

static unsigned char *state;
static uint32_t *ledger;
static size_t npages;
static uint64_t rng = 88172645463325252ull;

static uint64_t next_rand(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void write_page(size_t i)
{
	uint64_t v = ((uint64_t)i << 32) | ledger[i];
	memcpy(state + i * PAGE, &v, 8);
	memcpy(state + i * PAGE + PAGE - 8, &v, 8);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#define OUTMAX (1 << 20)

struct client {
	int fd;
	unsigned char in[16];
	size_t have;
	unsigned char *out;     /* answers the client has not taken yet */
	size_t outlen;
};

/* Send what is waiting; a full socket buffer (a client that reads late)
 * keeps the rest for later, up to OUTMAX. */
static void flush_out(struct client *c)
{
	while (c->outlen) {
		ssize_t w = send(c->fd, c->out, c->outlen, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR)
				return;
			fail("client fd %d: send: %s", c->fd, strerror(errno));
		}
		memmove(c->out, c->out + w, c->outlen - (size_t)w);
		c->outlen -= (size_t)w;
	}
}

int main(int argc, char **argv)
{
	static struct client cl[MAXC];
	struct pollfd pfd[MAXC + 1];
	int ncl = 0, lfd, one = 1, zero = 0;
	unsigned long long rewritten = 0, answered = 0, served = 0;
	double rate, t_last, owed = 0;
	struct sockaddr_in6 a = { .sin6_family = AF_INET6 };

	test_init(argc, argv);
	if (argc < 3)
		fail("usage: memservice PORT MIB [RATE_MB_S]");
	npages = (size_t)atol(argv[2]) * 256;
	rate = (argc > 3 ? atof(argv[3]) : 20.0) * 1e6 / PAGE;   /* pages per second */
	state = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		     -1, 0);
	ledger = calloc(npages, sizeof(*ledger));
	if (state == MAP_FAILED || !ledger)
		fail("cannot allocate %zu pages", npages);
	for (size_t i = 0; i < npages; i++) {
		memset(state + i * PAGE, (int)(i & 0xff), PAGE);
		write_page(i);
	}
	lfd = socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0);
	a.sin6_port = htons((uint16_t)atoi(argv[1]));
	if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    setsockopt(lfd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) ||
	    bind(lfd, (struct sockaddr *)&a, sizeof(a)) || listen(lfd, 64))
		fail("listen on port %s: %s", argv[1], strerror(errno));
	test_ready();
	t_last = now();
	while (!test_stop) {
		int n = 0;
		pfd[n++] = (struct pollfd){ .fd = lfd, .events = POLLIN };
		for (int i = 0; i < ncl; i++)
			pfd[n++] = (struct pollfd){ .fd = cl[i].fd,
						    .events = POLLIN | (cl[i].outlen ? POLLOUT : 0) };
		if (poll(pfd, (nfds_t)n, 1) < 0 && errno != EINTR)
			fail("poll: %s", strerror(errno));
		/* Rewrite pages at the rate, whatever the clients do. */
		double t = now();
		owed += (t - t_last) * rate;
		t_last = t;
		if (owed > rate)            /* never a burst over one second's worth */
			owed = rate;
		while (owed >= 1) {
			size_t i = (size_t)(next_rand() % npages);
			ledger[i]++;
			write_page(i);
			rewritten++;
			owed -= 1;
		}
		if (pfd[0].revents & POLLIN) {
			int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
			if (fd >= 0 && ncl < MAXC) {
				setsockopt(fd, IPPROTO_TCP, 1 /* TCP_NODELAY */, &one, sizeof(one));
				cl[ncl++] = (struct client){ .fd = fd, .out = malloc(OUTMAX) };
				if (!cl[ncl - 1].out)
					fail("malloc");
				served++;
			} else if (fd >= 0) {
				close(fd);
			}
		}
		for (int i = 0; i < ncl; i++) {
			struct client *c = &cl[i];
			flush_out(c);
			for (;;) {
				ssize_t r = recv(c->fd, c->in + c->have, sizeof(c->in) - c->have, 0);
				if (r < 0 && (errno == EAGAIN || errno == EINTR))
					break;
				if (r < 0)
					fail("client fd %d: recv: %s", c->fd, strerror(errno));
				if (r == 0) {
					close(c->fd);
					free(c->out);
					cl[i--] = cl[--ncl];
					break;
				}
				c->have += (size_t)r;
				if (c->have == sizeof(c->in)) {
					uint64_t seq, page, out[2];
					memcpy(&seq, c->in, 8);
					memcpy(&page, c->in + 8, 8);
					out[0] = seq;
					out[1] = ledger[page % npages];
					if (c->outlen + sizeof(out) > OUTMAX)
						fail("client fd %d: %zu bytes of answers not taken",
						     c->fd, c->outlen);
					memcpy(c->out + c->outlen, out, sizeof(out));
					c->outlen += sizeof(out);
					flush_out(c);
					c->have = 0;
					answered++;
				}
			}
		}
	}
	for (size_t i = 0; i < npages; i++) {
		uint64_t v = ((uint64_t)i << 32) | ledger[i], head, tail;
		memcpy(&head, state + i * PAGE, 8);
		memcpy(&tail, state + i * PAGE + PAGE - 8, 8);
		if (head != v || tail != v)
			fail("page %zu: holds %#llx/%#llx, the ledger says %#llx", i,
			     (unsigned long long)head, (unsigned long long)tail,
			     (unsigned long long)v);
		if (state[i * PAGE + 100] != (unsigned char)(i & 0xff))
			fail("page %zu: its filling changed", i);
	}
	{
		char msg[200];
		snprintf(msg, sizeof(msg), "%zu pages checked, %llu rewrites, %llu requests "
			 "answered, %llu clients\n", npages, rewritten, answered, served);
		test_msg(msg);
	}
	pass();
}
