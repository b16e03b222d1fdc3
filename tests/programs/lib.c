/* Implementation of lib.h; see there for the contract. */
#include "lib.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

volatile sig_atomic_t test_stop;

static void sigterm_handler(int sig)
{
	(void)sig;
	test_stop = 1;
}

void test_init(int argc, char **argv)
{
	struct sigaction sa;

	(void)argc;
	(void)argv;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = sigterm_handler;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;	/* no SA_RESTART: blocking calls see EINTR */
	if (sigaction(SIGTERM, &sa, NULL) < 0) {
		test_msg("FAIL: test_init: sigaction(SIGTERM) failed\n");
		exit(1);
	}
}

void test_msg(const char *s)
{
	size_t len = strlen(s);

	while (len > 0) {
		ssize_t n = write(1, s, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		s += n;
		len -= (size_t)n;
	}
}

void test_ready(void)
{
	test_msg("READY\n");
}

void test_waitsig(void)
{
	sigset_t term, orig, wait_mask;

	/*
	 * Block SIGTERM while testing the flag so it cannot slip in between the
	 * test and the sleep; sigsuspend() atomically unblocks it.  Every other
	 * signal keeps the caller's blocked/unblocked state.
	 */
	sigemptyset(&term);
	sigaddset(&term, SIGTERM);
	sigprocmask(SIG_BLOCK, &term, &orig);
	wait_mask = orig;
	sigdelset(&wait_mask, SIGTERM);
	while (!test_stop)
		sigsuspend(&wait_mask);
	sigprocmask(SIG_SETMASK, &orig, NULL);
}

void pass(void)
{
	test_msg("PASS\n");
	exit(0);
}

void fail(const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	int n;

	memcpy(buf, "FAIL: ", 6);
	va_start(ap, fmt);
	n = vsnprintf(buf + 6, sizeof(buf) - 7, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > (int)sizeof(buf) - 8)
		n = (int)sizeof(buf) - 8;
	buf[6 + n] = '\n';
	buf[7 + n] = '\0';
	test_msg(buf);
	exit(1);
}
